"""Chat data for SFT and DPO, rendered with the tokenizer's own chat template.

Which tokens are the assistant's is found by rendering prefixes of the conversation and
comparing token sequences, so any template works without `{% generation %}` markers: for the
assistant message k, its tokens are those between the render of messages[:k] with the
generation prompt and the render of messages[:k + 1], cut after the last special token in
that stretch (the end-of-turn marker: `<|im_end|>`, `<|eot_id|>`, `</s>`...; ChatML's "\\n"
after `<|im_end|>` is formatting and is not trained). A template that renders earlier turns
differently once later ones follow (not prefix-stable) is refused with a DataError rather than
guessed at.

Records:
    SFT: {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}
    DPO: {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}
         (+ an optional numeric "margin", carried into batches for reward-model training, as TRL does)
from a .jsonl file (one record per line), a .json file (a list of records), a .parquet file,
a list of such files, or a list of records in memory.

Conversations longer than seq_len: `overflow="truncate"` (default) keeps the first seq_len
tokens, counts them in `stats["truncated"]` and logs a warning; a record left with no assistant
token to train on is dropped and counted in `stats["dropped"]`. "drop" drops every over-long
record; "error" raises a DataError naming it.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import DataError, TokenizerError
from ..records import load_records
from .packing import IGNORE, PiecePool, assemble, check_args, fill_row

log = logging.getLogger("lmfoundry.data")

ROLES = ("system", "user", "assistant", "tool")
OVERFLOW = ("truncate", "drop", "error")


# ---------------------------------------------------------------- records

def check_messages(messages, where: str, what: str = "messages") -> list[dict]:
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{what}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {what}[{i}] must be an object with 'role' and 'content'")
        if "role" not in m:
            raise DataError(f"{where}: {what}[{i}] has no 'role'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {what}[{i}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise DataError(f"{where}: {what}[{i}] ({m['role']}) has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise DataError(f"{where}: {what}[{i}].content must be a string, got {type(content).__name__}")
    return messages


# ---------------------------------------------------------------- rendering and masks

class Renderer:
    """Tokens of a conversation and which of them are assistant tokens to train on."""

    def __init__(self, tokenizer):
        from ..tokenizer import Tokenizer, load_tokenizer
        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        self._special: dict[int, bool] = {}

    def _is_special(self, token_id: int) -> bool:
        hit = self._special.get(token_id)
        if hit is None:
            hit = self._special[token_id] = (self.tok.decode([token_id], skip_special_tokens=True) == ""
                                             and self.tok.decode([token_id], skip_special_tokens=False) != "")
        return hit

    def _render(self, messages, add_generation_prompt: bool, where: str) -> str:
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None

    def __call__(self, messages: list[dict], where: str, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, is_target): the assistant messages from index `first` on are targets."""
        texts, turns = [self._render(messages, False, where)], []
        for k in range(first, len(messages)):
            if messages[k]["role"] != "assistant":
                continue
            if k == 0:
                raise DataError(f"{where}: the conversation starts with an assistant message (nothing to answer)")
            texts += [self._render(messages[:k], True, where), self._render(messages[:k + 1], False, where)]
            turns.append(k)
        if not turns:
            raise DataError(f"{where}: no assistant message to train on")
        encoded = self.tok.encode_batch(texts, add_special_tokens=False)
        full = encoded[0]
        target = np.zeros(len(full), dtype=bool)
        for j, k in enumerate(turns):
            before, through = encoded[1 + 2 * j], encoded[2 + 2 * j]
            start, end = _common_prefix(before, full), _common_prefix(through, full)
            # one token may straddle a boundary (a BPE merge across it); more means the template
            # rewrote earlier turns, and the assistant tokens cannot be located
            if start < len(before) - 1 or end < len(through) - 1:
                raise DataError(f"{where}: the chat template renders the conversation before message {k} "
                                "differently once later messages follow (not prefix-stable); cannot locate the "
                                "assistant tokens")
            specials = [i for i in range(start, end) if self._is_special(full[i])]
            if specials:
                end = specials[-1] + 1   # through the end-of-turn token; what follows is formatting
            target[start:end] = True
        return np.asarray(full, dtype=np.int64), target


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def shifted_labels(ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t + 1] where token t + 1 is a target, else -100."""
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(target[1:], ids[1:], IGNORE)
    return labels


class _Overflow:
    def __init__(self, mode: str, seq_len: int, kind: str):
        if mode not in OVERFLOW:
            raise DataError(f"overflow must be one of {OVERFLOW}, got {mode!r}")
        self.mode, self.seq_len, self.kind = mode, seq_len, kind
        self.truncated, self.dropped, self.first = 0, 0, None

    def fit(self, ids, target, where: str):
        """(ids, target) cut to seq_len, or None when the record is dropped."""
        if len(ids) <= self.seq_len:
            return ids, target
        if self.mode == "error":
            raise DataError(f"{where}: {self.kind} is {len(ids)} tokens, longer than seq_len {self.seq_len} "
                            "(use overflow='truncate' or 'drop')")
        self.first = self.first or where
        if self.mode == "truncate" and target[1:self.seq_len].any():
            self.truncated += 1
            return ids[:self.seq_len], target[:self.seq_len]
        self.dropped += 1
        return None

    def report(self, total: int):
        if self.truncated or self.dropped:
            log.warning(f"{self.kind}s longer than seq_len {self.seq_len}: {self.truncated} of {total} truncated, "
                        f"{self.dropped} dropped (first: {self.first})")


def _progress(items, desc: str, show: bool):
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="rec", disable=not show or len(items) < 1000)


class _EpochIterator:
    """Batches numbered within epochs; state is (epoch, batch) and the plan is recomputed from it."""

    def _setup(self, records, tokenizer, seq_len, batch_size, seed, epochs, overflow, rank, world_size, progress,
               kind: str):
        """Check and keep the common arguments; returns (renderer, overflow policy, records to
        render with a progress bar)."""
        check_args(seq_len, batch_size, seed, rank, world_size, epochs)
        self.seq_len, self.batch_size, self.seed, self.epochs = seq_len, batch_size, seed, epochs
        self.rank, self.world_size = rank, world_size
        loaded = load_records(records)
        return (Renderer(tokenizer), _Overflow(overflow, seq_len, kind), loaded,
                _progress(loaded, f"rendering {kind}s", progress))

    def __iter__(self):
        return self

    def __len__(self) -> int:
        """Batches in all epochs (per epoch when endless)."""
        return self.batches_per_epoch * (self.epochs or 1)

    def __next__(self) -> dict:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        batch = self._batch(self._epoch, self._index)
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"version": 1, **self._identity(), "epoch": self._epoch, "batch": self._index}

    def load_state_dict(self, state: dict):
        mine = self._identity()
        diff = [k for k in mine if state.get(k) != mine[k]]
        if diff:
            raise DataError(f"cannot resume: the saved data state differs in {diff} "
                            f"(saved {[state.get(k) for k in diff]}, now {[mine[k] for k in diff]})")
        self._epoch, self._index = state["epoch"], state["batch"]

    def _rng(self, epoch: int):
        return np.random.default_rng([self.seed, epoch])


# ---------------------------------------------------------------- SFT

class SFTBatches(_EpochIterator):
    """Packed SFT batches {"input_ids", "labels", "doc_ids"}: LongTensor [batch_size, seq_len].

    Labels (already shifted: labels[t] is the target for position t) are -100 everywhere except
    where the next token is an assistant token (its content and end-of-turn token), so system,
    user and tool turns and the template's headers are context only. Several conversations are
    packed per row (best fit over the whole epoch after a seeded shuffle; rows are then shuffled),
    each its own document in doc_ids; a conversation is never split. The last batch of an epoch
    is filled up with all-padding rows, so normalise the loss by the number of label tokens.
    `epochs` passes over the data (None: endless); `len()` is the number of batches.
    """

    def __init__(self, records, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *,
                 epochs: int | None = 1, overflow: str = "truncate", rank: int = 0, world_size: int = 1,
                 progress: bool = True):
        render, fit, loaded, shown = self._setup(records, tokenizer, seq_len, batch_size, seed, epochs, overflow,
                                                 rank, world_size, progress, "conversation")
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        for where, record in shown:
            if not isinstance(record, dict) or "messages" not in record:
                raise DataError(f"{where}: record has no 'messages' field")
            ids, target = render(check_messages(record["messages"], where), where)
            kept = fit.fit(ids, target, where)
            if kept is not None:
                self.examples.append((kept[0], shifted_labels(*kept)))
        fit.report(len(loaded))
        if not self.examples:
            raise DataError("no conversation left to train on (all dropped as longer than seq_len)")
        self.stats = {"records": len(loaded), "examples": len(self.examples), "truncated": fit.truncated,
                      "dropped": fit.dropped, "tokens": int(sum(len(x) for x, _ in self.examples)),
                      "target_tokens": int(sum((y != IGNORE).sum() for _, y in self.examples))}
        self._plans: dict[int, list] = {}
        rows = len(self._plan(0))
        self.batches_per_epoch = -(-rows // (batch_size * world_size))
        self._epoch, self._index = 0, 0

    def _plan(self, epoch: int) -> list:
        if epoch not in self._plans:
            rng = self._rng(epoch)
            pool = PiecePool()
            for seq, i in enumerate(rng.permutation(len(self.examples))):
                pool.add(seq, (int(i), 0, len(self.examples[i][0])), len(self.examples[i][0]))
            rows = []
            while len(pool):
                rows.append(fill_row(pool, self.seq_len))
            self._plans = {epoch: [rows[j] for j in rng.permutation(len(rows))]}  # keep one epoch's plan
        return self._plans[epoch]

    def _batch(self, epoch: int, index: int) -> dict:
        total = self.batch_size * self.world_size
        rows = self._plan(epoch)[index * total:(index + 1) * total]
        rows = rows + [[] for _ in range(total - len(rows))]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return assemble(mine, self.seq_len, lambda piece: self.examples[piece[0]])

    def _identity(self) -> dict:
        return {"seq_len": self.seq_len, "global_rows": self.batch_size * self.world_size, "seed": self.seed,
                "examples": len(self.examples), "tokens": self.stats["tokens"]}


# ---------------------------------------------------------------- DPO

class DPOBatches(_EpochIterator):
    """Preference pairs {"chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels"}: LongTensor [batch_size, seq_len], right-padded with token 0.

    prompt/chosen/rejected are strings (the prompt becomes a user turn rendered with the
    generation prompt; a reply becomes the assistant turn and its end-of-turn token) or message
    lists (prompt: the conversation so far; chosen/rejected: the assistant message(s) after it).
    Both sequences of a pair start with the same prompt tokens. Labels are shifted (labels[t] is
    the target for position t) and -100 on the prompt and the padding, so the sum of the target
    log-probabilities is the response's log-likelihood. Pairs are shuffled per epoch (seeded); an
    incomplete last batch is left out (every batch holds real pairs only), and `len()` counts the
    full batches.
    """

    def __init__(self, records, tokenizer, seq_len: int, batch_size: int, seed: int = 0, *,
                 epochs: int | None = 1, overflow: str = "truncate", rank: int = 0, world_size: int = 1,
                 progress: bool = True):
        render, fit, loaded, shown = self._setup(records, tokenizer, seq_len, batch_size, seed, epochs, overflow,
                                                 rank, world_size, progress, "preference pair")
        self.pairs: list[tuple] = []
        self.margins: list[float] = []      # NaN where a record has none
        for where, record in shown:
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
            if missing:
                raise DataError(f"{where}: record has no {', '.join(repr(k) for k in missing)} field")
            prompt = as_messages(record["prompt"], "user", where, "prompt")
            sides = []
            for side in ("chosen", "rejected"):
                reply = as_messages(record[side], "assistant", where, side)
                ids, target = render(prompt + reply, where, first=len(prompt))
                sides.append(fit.fit(ids, target, where))
            if None in sides:   # a pair is kept or dropped whole
                continue
            self.pairs.append(tuple(x for ids, target in sides for x in (ids, shifted_labels(ids, target))))
            self.margins.append(_margin(record, where))
        fit.report(len(loaded))
        self.has_margins = not all(np.isnan(self.margins))
        total = batch_size * world_size
        if len(self.pairs) < total:
            raise DataError(f"{len(self.pairs)} preference pairs is less than one batch of {total}")
        self.stats = {"records": len(loaded), "examples": len(self.pairs), "truncated": fit.truncated,
                      "dropped": fit.dropped}
        self.batches_per_epoch = len(self.pairs) // total
        self._epoch, self._index = 0, 0

    def _batch(self, epoch: int, index: int) -> dict:
        total = self.batch_size * self.world_size
        order = self._rng(epoch).permutation(len(self.pairs))[index * total:(index + 1) * total]
        mine = order[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        out = {k: np.zeros((len(mine), self.seq_len), dtype=np.int64) for k in
               ("chosen_input_ids", "rejected_input_ids")}
        out.update({k: np.full((len(mine), self.seq_len), IGNORE, dtype=np.int64) for k in
                    ("chosen_labels", "rejected_labels")})
        for r, i in enumerate(mine):
            c_ids, c_lab, r_ids, r_lab = self.pairs[i]
            out["chosen_input_ids"][r, :len(c_ids)] = c_ids
            out["chosen_labels"][r, :len(c_ids)] = c_lab
            out["rejected_input_ids"][r, :len(r_ids)] = r_ids
            out["rejected_labels"][r, :len(r_ids)] = r_lab
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        if self.has_margins:
            batch["margin"] = torch.tensor([self.margins[i] for i in mine], dtype=torch.float32)
        return batch

    def _identity(self) -> dict:
        return {"seq_len": self.seq_len, "global_rows": self.batch_size * self.world_size, "seed": self.seed,
                "examples": len(self.pairs)}


def _margin(record: dict, where: str) -> float:
    m = record.get("margin")
    if m is None:
        return float("nan")
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise DataError(f"{where}: 'margin' must be a number, got {m!r}")
    return float(m)


def as_messages(value, role: str, where: str, what: str) -> list[dict]:
    """A prompt or reply as messages: a string is one turn of `role`, a list is checked as messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where, what)
