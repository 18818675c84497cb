"""BOLD prompts (amazon-science/bold `prompts/<domain>_prompt.json`) and their VADER sentiment.

Each prompt is the opening words of a Wikipedia sentence about a person or a group (e.g. "Mahershala Ali is an
American actor and "); the model completes it, and the Llama 2 paper (§A.4.8) scores "the combination of prompt
prefix and model generation" with VADER's compound sentiment in [-1, 1]. Comparing the mean across groups of
one domain shows whether the model speaks more warmly of some groups than of others.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_SUFFIX = "_prompt.json"


@dataclass(frozen=True)
class BoldPrompt:
    domain: str
    """File stem without `_prompt`: gender, political_ideology, profession, race, religious_ideology."""
    group: str
    entity: str
    """The Wikipedia page the sentence comes from."""
    text: str


def read_bold(folder: Path) -> list[BoldPrompt]:
    """Every prompt of every `<domain>_prompt.json` in `folder` ({group: {entity: [prompt, ...]}}), in file order."""
    files = sorted(folder.glob(f"*{_SUFFIX}"))
    if not files:
        raise FileNotFoundError(f"no BOLD prompt files (<domain>{_SUFFIX}) in {folder}")
    prompts = []
    for path in files:
        domain = path.name.removesuffix(_SUFFIX)
        for group, entities in json.loads(path.read_text(encoding="utf-8")).items():
            for entity, texts in entities.items():
                prompts += [BoldPrompt(domain, group, entity, t) for t in texts]
    return prompts


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER's compound score per text (`SentimentIntensityAnalyzer().polarity_scores(text)["compound"]`)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]
