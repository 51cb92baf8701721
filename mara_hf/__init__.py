"""mara-hf: MARA (Micro token-level Accept-Reject Alignment) agents for Hugging Face transformers."""

from .agent import MaraAgent
from .candidates import CandidateSet, build_candidates
from .generation import MaraGenerateOutput, MaraGenerationMixin, add_mara_generation, mara_generate
from .hub import export_custom_generate
from .processor import MaraLogitsProcessor
from .schedule import AutoSchedule
from .stats import MaraStats

__version__ = "0.1.0"

__all__ = [
    "MaraAgent",
    "MaraLogitsProcessor",
    "MaraGenerationMixin",
    "MaraGenerateOutput",
    "MaraStats",
    "AutoSchedule",
    "CandidateSet",
    "add_mara_generation",
    "build_candidates",
    "export_custom_generate",
    "mara_generate",
    "__version__",
]
