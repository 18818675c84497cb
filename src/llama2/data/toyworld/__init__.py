"""The toy world (DESIGN §5): a seeded procedural world, its datasets, and oracle judges.

    from llama2.data.toyworld import ToyWorld
    tw = ToyWorld(seed=0)
    tw.helpfulness([{"role": "user", "content": "What is 12 plus 30?"}], "12 plus 30 is 42.")
"""

from llama2.data.toyworld.constraints import Constraint
from llama2.data.toyworld.dialogs import Prompt
from llama2.data.toyworld.judges import SAFE_THRESHOLD, PromptInfo
from llama2.data.toyworld.pairs import Candidate, flip_probability, rating_level
from llama2.data.toyworld.safety import is_refusal
from llama2.data.toyworld.toyworld import VERSION, ToyWorld

__all__ = ["SAFE_THRESHOLD", "VERSION", "Candidate", "Constraint", "Prompt", "PromptInfo", "ToyWorld",
           "flip_probability", "is_refusal", "rating_level"]
