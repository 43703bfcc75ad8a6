"""How much of a data file its tokenizer cannot spell: the share of `<unk>` tokens in the first samples' renderings,
and the words behind them, so a tokenizer that lacks the data's words (every word `<unk>`, trained on silently) is
found before any worker starts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mimo.data.conversation import ConversationError, parse_entry
from mimo.hf.prompt import Prompter


@dataclass(frozen=True)
class UnknownTokens:
    """Over `samples` renderings: `unknown` of `tokens` were the unknown token; `words` the most frequent text
    behind them."""

    samples: int
    tokens: int
    unknown: int
    words: tuple[str, ...]

    @property
    def rate(self) -> float:
        """The unknown tokens' share of all tokens (0 for none)."""
        return self.unknown / self.tokens if self.tokens else 0.0


def unknown_tokens(entries, template, prompter: Prompter, samples: int = 256, shown: int = 5) -> UnknownTokens | None:
    """The unknown tokens of the first `samples` entries rendered by `template` (malformed ones skipped: they are
    bad samples, counted elsewhere); None when the tokenizer has no unknown token (byte-level ones spell all)."""
    unk_id = prompter.token_id(prompter.special_tokens.get("unk_token", ""))
    if unk_id is None:
        return None
    tokens = unknown = counted = 0
    words: Counter[str] = Counter()
    for index in range(min(samples, len(entries))):
        try:
            rendered = template.render(parse_entry(entries[index]))
        except ConversationError:
            continue
        encoding = prompter.encode(rendered.text, rendered.add_special_tokens)
        counted += 1
        tokens += len(encoding.ids)
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id == unk_id:
                unknown += 1
                words[rendered.text[start:end]] += 1
    return UnknownTokens(counted, tokens, unknown, tuple(w for w, _ in words.most_common(shown)))
