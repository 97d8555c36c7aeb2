"""Benchmark methods as records: what `dspark bench` measured (plain, a drafter-free method, or a
trained head under a verification policy) at a concurrency R. The display name ("dspark+sched@R8")
is derived in `Method.name` only; every reader of bench.json (eval/report.py, the model card, export,
`dspark run`) selects rows by these fields, never by parsing names. Here because the bench that writes
bench.json (eval/) and its readers in hub/ and cli/ all import core/."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

HUGGING_FACE = ("hf_prompt_lookup", "hf_generate")          # Hugging Face `generate`, one request at a time
DRAFTER_FREE = ("oracle", "prompt_lookup") + HUGGING_FACE   # bench `methods` keys besides plain


@dataclass(frozen=True)
class Method:
    """One benchmarked method. `head`: None for plain decoding, a drafter-free method's key (DRAFTER_FREE)
    or a trained head's name (dspark, dflash, eagle3, `<kind>:<folder>` on a clash); `policy`: a trained
    head's verification policy (all, sched, threshold, gamma<N>), None for the others; `concurrency`: R."""

    head: str | None = None
    policy: str | None = None
    concurrency: int = 1

    @property
    def name(self) -> str:
        """The display name, the row's key in bench.json and its label in every table: plain, oracle,
        dspark (verify-all), dspark+sched, and `@R<n>` appended at concurrency n > 1 (plain@R2)."""
        base = (self.head or "plain") + (f"+{self.policy}" if self.policy not in (None, "all") else "")
        return base if self.concurrency == 1 else f"{base}@R{self.concurrency}"

    @property
    def trained(self) -> bool:
        """A trained head's method (it always runs under a policy)."""
        return self.policy is not None

    @property
    def hugging_face(self) -> bool:
        """Hugging Face `generate`: R=1 only, no runtime internals."""
        return self.head in HUGGING_FACE

    def at(self, concurrency: int) -> Method:
        return replace(self, concurrency=concurrency)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def of_row(cls, key: str, row: dict) -> Method:
        """The record of a bench.json row: its `method` field, or, in a bench.json written before rows
        carried one (e.g. heads/*/metrics/), parsed from its key."""
        if isinstance(row.get("method"), dict):
            return cls(**row["method"])
        base, _, r = key.partition("@R")
        head, _, policy = base.partition("+")
        if head == "plain":
            return cls(concurrency=int(r or 1))
        return cls(head, None if head in DRAFTER_FREE else policy or "all", int(r or 1))


def records(bench: dict) -> dict[Method, dict]:
    """A bench.json's rows by their method record."""
    return {Method.of_row(k, m): m for k, m in (bench.get("methods") or {}).items()}


def head_row(bench: dict, head: str) -> dict | None:
    """The row of trained head `head` under verify-all at R=1 (the head's headline), if the run has one."""
    return records(bench).get(Method(head, "all"))
