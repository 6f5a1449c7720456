"""tiny-thinker's ground-truth token events against the transcripts' own text."""

from __future__ import annotations

from mechthink.models.organism import EVENT_KINDS, build_hf_tokenizer, sample_transcripts, token_events


def test_token_events_match_the_text() -> None:
    tok = build_hf_tokenizer()
    transcripts = sample_transcripts(40, seed="events-test")
    seen: set[str] = set()
    for tr in transcripts:
        events = token_events(tr)
        seen |= set(events.values())
        assert set(events.values()) <= set(EVENT_KINDS)
        assert all(tr.think_open_position < p < tr.think_close_position for p in events)
        for s in tr.steps:
            kind = "wrong result" if s.is_error else "step result"
            assert all(events[p] == kind for p in s.result_positions)
            assert tok.decode([tr.input_ids[p] for p in s.result_positions]) == str(s.written_result)
            if s.backtrack_position is not None:
                assert events[s.backtrack_position] == "backtrack word"
                assert tok.decode([tr.input_ids[s.backtrack_position]]) == s.backtrack_word
        assert events[tr.wrapup_position] == "wrap-up"
        labelled_results = {p for s in tr.steps for p in s.result_positions}
        for p in (p for occ in tr.answer_positions for p in occ):
            assert tok.decode([tr.input_ids[p]]).strip().isdigit()
            if p not in labelled_results:  # a step's result keeps its step label
                assert events[p] == "answer occurrence"
    assert seen == set(EVENT_KINDS)  # 40 transcripts show every kind
