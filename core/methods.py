"""Benchmark methods as records: what `dspark bench` measured (plain, a drafter-free method, or a
trained head under a verification policy) at a concurrency R. The display name ("dspark+sched@R8")
is derived in `Method.name` only; every reader of bench.json (eval/report.py, the model card, export,
`dspark run`) selects rows by these fields, never by parsing names. Here because the bench that writes
bench.json (eval/) and its readers in hub/ and cli/ all import core/."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

HUGGING_FACE = ("hf_prompt_lookup", "hf_generate")          # Hugging Face `generate`, one request at a time
DRAFTER_FREE = ("oracle", "prompt_lookup") + HUGGING_FACE   # bench `methods` keys besides plain
COMBINED = ("lookup",)    # sources a trained head can be combined with (inference/combined.py)


def split_policy(entry: str) -> tuple[str | None, str]:
    """A bench `policies` entry → (combined source, policy): `sched` → (None, "sched"); `lookup+sched` →
    ("lookup", "sched"), the head combined with prompt lookup under that policy; `lookup` alone is
    `lookup+all`. The policy part is not checked here (inference/policy.py `parse_policy` does)."""
    first, plus, rest = str(entry).partition("+")
    if first in COMBINED:
        return first, rest if plus else "all"
    return None, str(entry)


@dataclass(frozen=True)
class Method:
    """One benchmarked method. `head`: None for plain decoding, a drafter-free method's key (DRAFTER_FREE)
    or a trained head's name (dspark, dflash, eagle3, `<kind>:<folder>` on a clash); `policy`: a trained
    head's verification policy (all, sched, threshold, gamma<N>), None for the others; `concurrency`: R;
    `combined`: a trained head's extra source (COMBINED: `lookup`, the head combined with prompt lookup,
    inference/combined.py), None for the head alone (and absent from bench.json rows then)."""

    head: str | None = None
    policy: str | None = None
    concurrency: int = 1
    combined: str | None = None

    @property
    def name(self) -> str:
        """The display name, the row's key in bench.json and its label in every table: plain, oracle,
        dspark (verify-all), dspark+sched, dspark+lookup (combined with prompt lookup, verify-all),
        dspark+lookup+sched, and `@R<n>` appended at concurrency n > 1 (plain@R2)."""
        base = (self.head or "plain") + (f"+{self.combined}" if self.combined else "") \
            + (f"+{self.policy}" if self.policy not in (None, "all") else "")
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
        """The record as a bench.json row stores it; `combined` only when set, so rows of the methods
        that existed before it are written exactly as before."""
        out = asdict(self)
        if out["combined"] is None:
            del out["combined"]
        return out

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
        if head in DRAFTER_FREE:
            return cls(head, None, int(r or 1))
        combined, policy = split_policy(policy) if policy else (None, "all")
        return cls(head, policy, int(r or 1), combined)


def records(bench: dict) -> dict[Method, dict]:
    """A bench.json's rows by their method record."""
    return {Method.of_row(k, m): m for k, m in (bench.get("methods") or {}).items()}


def head_row(bench: dict, head: str) -> dict | None:
    """The row of trained head `head` under verify-all at R=1 (the head's headline), if the run has one."""
    return records(bench).get(Method(head, "all"))
