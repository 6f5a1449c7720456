"""Ground-truth token events of tiny-thinker transcripts: where the step results, the wrong
results, the backtracking words, the answer occurrences and the wrap-up are.

The transcript generator records every planted position, so a technique's per-token signal
(e.g. MI peaks, Qian et al. 2025) can be compared with known events. Source: this repository
(mechthink tiny-thinker).
"""

from __future__ import annotations

from mechthink.models.organism.tasks import Transcript

__all__ = ["EVENT_KINDS", "token_events"]

#: The event labels :func:`token_events` gives.
EVENT_KINDS: tuple[str, ...] = ("step result", "wrong result", "backtrack word", "answer occurrence", "wrap-up")


def token_events(transcript: Transcript) -> dict[int, str]:
    """``position -> event`` for the labelled tokens of one transcript.

    Every digit of a step's written result is ``"wrong result"`` when the step was first written
    wrong, else ``"step result"``; the backtracking word after a wrong step is
    ``"backtrack word"``; digits of the final answer inside the thinking not already labelled
    are ``"answer occurrence"``; the wrap-up word ("So") of the last thinking line is
    ``"wrap-up"``. Corrections (the redone steps) are not labelled.

    Args:
        transcript: A transcript from :func:`~mechthink.models.organism.sample_transcripts`.

    Returns:
        The labels, keyed by token position in ``transcript.input_ids``.

    Examples:
        >>> from mechthink.models.organism import sample_transcripts
        >>> tr = sample_transcripts(1, seed="doc")[0]
        >>> events = token_events(tr)
        >>> events[tr.wrapup_position], set(events.values()) <= set(EVENT_KINDS)
        ('wrap-up', True)
    """
    events: dict[int, str] = {}
    for s in transcript.steps:
        for p in s.result_positions:
            events[p] = "wrong result" if s.is_error else "step result"
        if s.backtrack_position is not None:
            events[s.backtrack_position] = "backtrack word"
    for occ in transcript.answer_positions:
        for p in occ:
            events.setdefault(p, "answer occurrence")
    if transcript.wrapup_position >= 0:
        events[transcript.wrapup_position] = "wrap-up"
    return events
