"""The inference runtime: batched lossless speculative decoding over a frozen target."""
from .combined import CombinedDrafter
from .drafters import Drafter, OracleDrafter, PromptLookupDrafter, Proposal, RandomDrafter, RequestState
from .dspark_drafter import DSparkDrafter
from .eagle3_drafter import Eagle3Drafter
from .engine import Engine, Result, Stats
from .head_drafters import drafter_for
from .policy import VerifyAll

__all__ = ["CombinedDrafter", "DSparkDrafter", "Drafter", "Eagle3Drafter", "Engine", "OracleDrafter", "PromptLookupDrafter", "Proposal", "RandomDrafter",
           "RequestState", "Result", "Stats", "VerifyAll", "drafter_for"]
