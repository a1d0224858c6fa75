"""Two-tower retrieval model on torchrec: a query tower and an item tower meeting in one vector space.

Query tower: the user id (hashed, with a reserved "unknown" bucket), the user's
recent items as jagged features (the last-N distinct items, pooled, and the
last few, pooled separately so the current session weighs more), the
categories of those items, and context (hour of day). Item tower: item id
(vocabulary, plus hashed buckets for items never seen in training) and item
attributes (category). Both end in L2-normalised vectors, so retrieval is an
inner-product (cosine) search in FAISS.

Sparse inputs go through torchrec ``KeyedJaggedTensor`` and
``EmbeddingBagCollection``; on a GPU host the same modules run on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from kestrel.models.device import pick_device
from kestrel.models.hybrid_recs import ItemItem

QUERY_KEYS = ("user_id", "hist_items", "recent_items", "hist_cats", "context")
ITEM_KEYS = ("item_id", "item_cat")
UNKNOWN_USER = 0  # bucket for users never seen in training (and for user-id dropout while training)
ARTIFACT_FORMAT = 1
SEQUENCE_KINDS = ("bag", "gru", "attention")


def stable_hash(value: str) -> int:
    """A hash that is the same in every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class TwoTowerConfig:
    n_items: int  # items in the training vocabulary: indices 0 .. n_items-1
    n_categories: int  # category vocabulary; index 0 is "unknown"
    user_buckets: int = 20_011
    oov_item_buckets: int = 997  # items never seen in training hash here (shared, so weakly informative)
    table_dim: int = 64
    output_dim: int = 64
    hidden_dim: int = 128
    history_len: int = 20  # last-N distinct items the query tower reads
    recent_len: int = 3  # the newest of those, pooled separately: the session signal
    n_context: int = 24  # hour-of-day buckets
    temperature: float = 0.2
    # how the query tower reads the history beside its pooled bags: "bag" (not at all: the bags only), "gru" (a
    # GRU over the history in time order, oldest first) or "attention" (the newest item attends over the history
    # with position embeddings: one head, SASRec's read-out at the last position without its full layer), on the
    # history table's rows
    sequence: str = "bag"

    @property
    def index_dim(self) -> int:
        """Vectors in the index carry one more dimension: the item bias (query side: a constant 1)."""
        return self.output_dim + 1

    @property
    def item_rows(self) -> int:
        return self.n_items + self.oov_item_buckets


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def jagged(keys: Sequence[str], columns: Sequence[Sequence[Sequence[int]] | np.ndarray],
           device: torch.device | None = None) -> KeyedJaggedTensor:
    """A KJT from one column per key; a column is a list of per-row id lists or a padded array (-1 = empty).

    >>> kjt = jagged(["a", "b"], [[[1], [2, 3]], np.array([[4, -1], [-1, -1]])])
    >>> kjt["b"].lengths().tolist(), kjt["a"].values().tolist()
    ([1, 0], [1, 2, 3])
    """
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for col in columns:
        if isinstance(col, np.ndarray):
            arr = col.reshape(len(col), -1)
            mask = arr >= 0
            values.append(arr[mask].astype(np.int64))
            lengths.append(mask.sum(axis=1).astype(np.int64))
        else:
            lengths.append(np.fromiter((len(r) for r in col), dtype=np.int64, count=len(col)))
            flat = [v for r in col for v in r]
            values.append(np.asarray(flat, dtype=np.int64))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys), values=torch.from_numpy(np.concatenate(values)).to(device),
        lengths=torch.from_numpy(np.concatenate(lengths)).to(device))


class TwoTower(nn.Module):
    """Query and item towers; ``query(kjt)`` and ``item(kjt)`` give unit vectors of ``output_dim``."""

    def __init__(self, config: TwoTowerConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = c = config
        device = device or torch.device("cpu")
        self.query_ebc = EmbeddingBagCollection(device=device, tables=[
            EmbeddingBagConfig(name="user", embedding_dim=c.table_dim, num_embeddings=c.user_buckets + 1,
                               feature_names=["user_id"], pooling=PoolingType.SUM),
            # One table read twice: all of the history, and the newest few items (the session).
            EmbeddingBagConfig(name="hist_item", embedding_dim=c.table_dim, num_embeddings=c.item_rows,
                               feature_names=["hist_items", "recent_items"], pooling=PoolingType.MEAN),
            EmbeddingBagConfig(name="hist_cat", embedding_dim=c.table_dim, num_embeddings=c.n_categories + 1,
                               feature_names=["hist_cats"], pooling=PoolingType.MEAN),
            EmbeddingBagConfig(name="context", embedding_dim=c.table_dim, num_embeddings=c.n_context,
                               feature_names=["context"], pooling=PoolingType.SUM),
        ])
        self.item_ebc = EmbeddingBagCollection(device=device, tables=[
            EmbeddingBagConfig(name="item", embedding_dim=c.table_dim, num_embeddings=c.item_rows,
                               feature_names=["item_id"], pooling=PoolingType.SUM),
            EmbeddingBagConfig(name="item_cat", embedding_dim=c.table_dim, num_embeddings=c.n_categories + 1,
                               feature_names=["item_cat"], pooling=PoolingType.SUM),
        ])
        if c.sequence not in SEQUENCE_KINDS:
            raise ValueError(f"sequence must be one of {SEQUENCE_KINDS}, not {c.sequence!r}")
        self.history_gru = nn.GRU(c.table_dim, c.table_dim, batch_first=True).to(device) \
            if c.sequence == "gru" else None
        if c.sequence == "attention":
            self.history_positions = nn.Embedding(c.history_len, c.table_dim, device=device)  # 0 = the newest
            nn.init.normal_(self.history_positions.weight, std=0.05)
            self.history_query = nn.Linear(c.table_dim, c.table_dim, device=device)
            self.history_out = nn.Linear(c.table_dim, c.table_dim, device=device)
        slots = len(QUERY_KEYS) + (c.sequence != "bag")
        self.query_mlp = _mlp(c.table_dim * slots, c.hidden_dim, c.output_dim).to(device)
        self.item_mlp = _mlp(c.table_dim * len(ITEM_KEYS), c.hidden_dim, c.output_dim).to(device)
        # A per-item bias (in logit units): how likely an item is for anyone, which a dot product of
        # unit vectors cannot express. It rides into FAISS as one extra dimension (query side: 1).
        self.item_bias = nn.Embedding(c.item_rows, 1, device=device)
        nn.init.zeros_(self.item_bias.weight)
        for ebc in (self.query_ebc, self.item_ebc):
            for bag in ebc.embedding_bags.values():
                nn.init.normal_(bag.weight, std=0.05)

    def query(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.query_ebc(kjt).to_dict()
        parts = [pooled[k] for k in QUERY_KEYS]
        if self.history_gru is not None:
            parts.append(self._history_state(kjt))
        elif self.config.sequence == "attention":
            parts.append(self._history_attention(kjt))
        return nn.functional.normalize(self.query_mlp(torch.cat(parts, dim=1)), dim=1)

    def _history_attention(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """The newest item's attention over each row's history (newest first, with position embeddings, padding
        masked); zeros for an empty history. One matrix product per batch: cheap enough to train on CPU."""
        jt = kjt["hist_items"]
        lengths = jt.lengths()
        width = max(1, min(int(lengths.max().item()) if len(lengths) else 1, self.config.history_len))
        rows = jt.to_padded_dense(desired_length=width, padding_value=0)
        table = self.query_ebc.embedding_bags["hist_item"].weight
        x = nn.functional.embedding(rows, table, sparse=True) + self.history_positions.weight[:width][None, :, :]
        pad = torch.arange(width, device=lengths.device)[None, :] >= lengths.clamp(min=1)[:, None]
        scores = torch.einsum("bwd,bd->bw", x, self.history_query(x[:, 0, :])) / self.config.table_dim ** 0.5
        weights = torch.softmax(scores.masked_fill(pad, float("-inf")), dim=1)
        out = self.history_out(torch.einsum("bw,bwd->bd", weights, x)) + x[:, 0, :]
        return out * (lengths > 0).to(out.dtype)[:, None]

    def _history_state(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """The GRU's last state over each row's history, oldest item first (the jagged feature is newest first);
        zeros for an empty history."""
        assert self.history_gru is not None
        jt = kjt["hist_items"]
        lengths = jt.lengths()
        width = max(1, int(lengths.max().item()) if len(lengths) else 1)
        newest_first = jt.to_padded_dense(desired_length=width, padding_value=0)  # rows x width
        t = torch.arange(width, device=lengths.device)[None, :]
        oldest_first = torch.gather(newest_first, 1, (lengths[:, None] - 1 - t).clamp(min=0))
        table = self.query_ebc.embedding_bags["hist_item"].weight
        emb = nn.functional.embedding(oldest_first, table, sparse=True)  # sparse gradients, as the bags (SparseAdam)
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.history_gru(packed)
        return h[-1] * (lengths > 0).to(h.dtype)[:, None]

    def item(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.item_ebc(kjt).to_dict()
        x = torch.cat([pooled[k] for k in ITEM_KEYS], dim=1)
        return nn.functional.normalize(self.item_mlp(x), dim=1)

    def logits(self, q: torch.Tensor, v: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """Score of every query against every item: ``q.v / temperature + bias``."""
        return q @ v.T / self.config.temperature + self.item_bias(item_rows).squeeze(1)[None, :]

    def index_vectors(self, v: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """``[v, temperature * bias]``: inner product with ``[q, 1]`` ranks exactly like ``logits``."""
        return torch.cat([v, self.config.temperature * self.item_bias(item_rows)], dim=1)

    def index_query(self, q: torch.Tensor) -> torch.Tensor:
        return torch.cat([q, torch.ones(len(q), 1, device=q.device, dtype=q.dtype)], dim=1)


@dataclass
class Vocab:
    """Raw ids to model rows: items by vocabulary (OOV hashed), categories by vocabulary (0 = unknown)."""

    item_ids: list[str]
    item_category: list[str]  # category of each vocabulary item ("" when unknown)
    categories: list[str]  # index i+1 in the category table
    user_hashes: np.ndarray  # sorted stable hashes of users seen in training (no raw user ids kept)
    config: TwoTowerConfig

    def __post_init__(self) -> None:
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.category_index = {cat: i + 1 for i, cat in enumerate(self.categories)}
        self.item_cat_row = np.asarray([self.category_index.get(c, 0) for c in self.item_category], dtype=np.int64)

    def item_row(self, item: str) -> int:
        row = self.item_index.get(item)
        if row is None:
            return self.config.n_items + stable_hash(item) % self.config.oov_item_buckets
        return row

    def item_rows(self, items: Sequence[str]) -> list[int]:
        return [self.item_row(i) for i in items]

    def category_of_row(self, row: int) -> int:
        return int(self.item_cat_row[row]) if row < self.config.n_items else 0

    def user_bucket(self, user: str) -> int:
        h = stable_hash(user)
        pos = int(np.searchsorted(self.user_hashes, h))
        if pos < len(self.user_hashes) and self.user_hashes[pos] == h:
            return 1 + h % self.config.user_buckets
        return UNKNOWN_USER


def hour_of(epoch_s: float) -> int:
    return int(epoch_s // 3600) % 24


class QueryEncoder:
    """Turns online features (user id, recent items newest first, time) into query vectors, in batches."""

    def __init__(self, model: TwoTower, vocab: Vocab, device: torch.device) -> None:
        self.model, self.vocab, self.device = model, vocab, device

    def features(self, users: Sequence[str], recent: Sequence[Sequence[str]],
                 now: float | Sequence[float] | None = None) -> KeyedJaggedTensor:
        """``now``: one time for all users, or one per user (offline evaluation)."""
        c, v = self.model.config, self.vocab
        now = time.time() if now is None else now
        times = [float(now)] * len(users) if isinstance(now, int | float) else list(now)
        hist = [v.item_rows(items[: c.history_len]) for items in recent]
        cats = [[cat for cat in (v.category_of_row(r) for r in rows) if cat] for rows in hist]
        return jagged(QUERY_KEYS, [[[v.user_bucket(u)] for u in users], hist, [h[: c.recent_len] for h in hist],
                                   cats, [[hour_of(t)] for t in times]], self.device)

    @torch.inference_mode()
    def encode(self, users: Sequence[str], recent: Sequence[Sequence[str]],
               now: float | Sequence[float] | None = None) -> np.ndarray:
        if not users:
            return np.zeros((0, self.model.config.index_dim), dtype=np.float32)
        q = self.model.query(self.features(users, recent, now))
        return self.model.index_query(q).float().cpu().numpy()


@torch.inference_mode()
def embed_items(model: TwoTower, vocab: Vocab, items: Sequence[str], categories: Sequence[str] | None = None,
                batch: int = 8192) -> np.ndarray:
    """Index vectors of items (tower output and bias); ``categories``: attributes of items not in the vocabulary."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        rows = vocab.item_rows(chunk)
        if categories is None:
            cats = [vocab.category_of_row(r) for r in rows]
        else:
            cats = [vocab.category_index.get(str(c), 0) for c in categories[start:start + batch]]
        kjt = jagged(ITEM_KEYS, [[[r] for r in rows], [[c] if c else [] for c in cats]], device)
        row_t = torch.tensor(rows, dtype=torch.int64, device=device)
        out.append(model.index_vectors(model.item(kjt), row_t).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.config.index_dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


@dataclass
class RecsArtifact:
    """A trained model, its vocabulary and the item vectors the FAISS index is built from."""

    version: str
    model: TwoTower
    vocab: Vocab
    item_embeddings: np.ndarray
    metadata: dict[str, Any]
    item_item: ItemItem | None = None  # EASE's weights blended in at serving (hybrid_recs), when trained with them

    def encoder(self) -> QueryEncoder:
        return QueryEncoder(self.model, self.vocab, next(self.model.parameters()).device)

    def save(self, root: str | Path) -> Path:
        """Write ``root/<version>/`` aside, then point ``root/CURRENT`` at it (atomic rename)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        final = root / self.version
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.version}-", dir=root))
        try:
            torch.save({k: t.cpu() for k, t in self.model.state_dict().items()}, tmp / "model.pt")
            np.save(tmp / "item_embeddings.npy", self.item_embeddings)
            np.save(tmp / "user_hashes.npy", self.vocab.user_hashes)
            meta = {**self.metadata, "format": ARTIFACT_FORMAT, "version": self.version,
                    "config": asdict(self.model.config), "item_ids": self.vocab.item_ids,
                    "item_category": self.vocab.item_category, "categories": self.vocab.categories}
            (tmp / "metadata.json").write_text(json.dumps(meta))
            if self.item_item is not None:
                self.item_item.save(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer = root / f".CURRENT.{os.getpid()}"
        pointer.write_text(self.version + "\n")
        os.replace(pointer, root / "CURRENT")
        return final


def resolve_artifact(path: str | Path) -> Path:
    """An artifact folder itself, or a root whose ``CURRENT`` names the version to use."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    current = path / "CURRENT"
    if current.exists():
        return path / current.read_text().strip()
    raise FileNotFoundError(f"no recommendation model at {path} (neither metadata.json nor CURRENT)")


def load_artifact(path: str | Path, device: torch.device | None = None) -> RecsArtifact:
    folder = resolve_artifact(path)
    meta = json.loads((folder / "metadata.json").read_text())
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{folder}: artifact format {meta.get('format')} is not {ARTIFACT_FORMAT}")
    config = TwoTowerConfig(**meta["config"])
    device = device or pick_device()
    model = TwoTower(config, device)
    model.load_state_dict(torch.load(folder / "model.pt", map_location=device, weights_only=True))
    model.eval()
    vocab = Vocab(meta["item_ids"], meta["item_category"], meta["categories"],
                  np.load(folder / "user_hashes.npy"), config)
    embeddings = np.load(folder / "item_embeddings.npy")
    extra = {k: v for k, v in meta.items() if k not in ("item_ids", "item_category", "categories", "config")}
    return RecsArtifact(meta["version"], model, vocab, embeddings, extra, ItemItem.load(folder))
