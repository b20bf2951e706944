"""The study rule on its own (edgekidney.study.rule): each condition at its boundary, the exact reasons a
report prints, and how the rule is chosen on validation series."""

import pytest

from edgekidney.study.rule import Decision, Run, StudyRule, choose_rule, decide, run_score, runs_above


def test_rule_parameters_are_checked():
    for bad, message in (({"min_run": 0}, "min_run must be at least 1, got 0"),
                         ({"threshold": -0.01}, "threshold must be in \\[0, 1\\], got -0.01"),
                         ({"threshold": 1.01}, "threshold must be in \\[0, 1\\], got 1.01"),
                         ({"max_out_of_scope_fraction": -0.1}, "max_out_of_scope_fraction must be in \\[0, 1\\]"),
                         ({"max_out_of_scope_fraction": 1.1}, "max_out_of_scope_fraction must be in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            StudyRule(**bad)
    StudyRule(min_run=1, threshold=0.0, max_out_of_scope_fraction=0.0)
    StudyRule(threshold=1.0, max_out_of_scope_fraction=1.0)
    assert StudyRule().to_dict() == {"min_run": 2, "threshold": None, "max_out_of_scope_fraction": 0.5,
                                     "min_focus_hu": None, "source": "default"}
    for bad in (-1025.0, 4000.5):
        with pytest.raises(ValueError, match="^min_focus_hu must be in"):
            StudyRule(min_focus_hu=bad)
    assert StudyRule(min_focus_hu=-1024.0).min_focus_hu == -1024.0 and StudyRule(min_focus_hu=4000.0)  # the ends


def test_a_slice_without_a_dense_focus_breaks_a_run_only_when_the_rule_asks():
    p, scope = [0.9, 0.9, 0.9, 0.9, 0.2], [True] * 5
    focus = [600.0, 150.0, 600.0, None, None]  # slice 3 was not measured: it counts
    gated = decide(p, scope, StudyRule(min_focus_hu=200), 0.5, focus)
    assert gated.decision == "stone" and gated.supporting == [Run(2, 3, 0.9)]
    assert gated.reason.endswith("; 1 slice(s) without a focus of >= 200 HU at the peak not counted")
    assert decide(p, scope, StudyRule(min_focus_hu=150), 0.5, focus).supporting == [Run(0, 3, 0.9)]  # at the floor
    assert decide(p, scope, StudyRule(), 0.5, focus).supporting == [Run(0, 3, 0.9)]  # off: focus is not read
    assert decide(p, scope, StudyRule(min_focus_hu=200), 0.5).supporting == [Run(0, 3, 0.9)]  # nothing measured
    assert decide(p, scope, StudyRule(min_focus_hu=700), 0.5, focus).decision == "no_stone"
    assert decide(p, scope, StudyRule(min_focus_hu=700), 0.5, focus).peak == 0  # the peak is still the likeliest
    # a slice exactly at the threshold is a call, so the floor applies to it too
    assert decide([0.5, 0.5], [True, True], StudyRule(min_focus_hu=200), 0.5, [100.0, 600.0]).decision == "no_stone"


def test_rule_from_a_card():
    class Card:
        extra = None

    assert StudyRule.from_card(Card()) == StudyRule() and StudyRule.from_card(object()) == StudyRule()
    Card.extra = {"study_rule": {}}
    assert StudyRule.from_card(Card()) == StudyRule()
    Card.extra = {"study_rule": {"max_out_of_scope_fraction": 0.2, "source": "forged"}}
    assert StudyRule.from_card(Card()) == StudyRule(max_out_of_scope_fraction=0.2, source="sidecar")


def test_runs_include_the_threshold_and_close_at_the_end():
    p = [0.5, 0.49, 0.7, 0.9, 0.6]
    runs = runs_above(p, [True] * 5, 0.5)
    assert runs == [Run(0, 0, 0.5), Run(2, 4, 0.9)] and [r.length for r in runs] == [1, 3]
    assert runs_above(p, [True, True, True, False, True], 0.5) == [Run(0, 0, 0.5), Run(2, 2, 0.7), Run(4, 4, 0.6)]
    assert runs_above([], [], 0.5) == [] and runs_above([0.1], [True], 0.5) == []


def test_stone_needs_min_run_consecutive_in_scope_slices_at_or_above_the_threshold():
    p = [0.1, 0.6, 0.6, 0.2, 0.9, 0.1]
    d = decide(p, [True] * 6, StudyRule(), 0.6)
    assert d == Decision("stone", "1 run(s) of >= 2 consecutive slices with p >= 0.6 (best: slices 1-2)", 0.6,
                         [Run(1, 2, 0.6)], 1)  # the peak shown is the call's evidence, not the lone 0.9 slice
    assert decide([0.1, 0.6, 0.7, 0.2, 0.9, 0.1], [True] * 6, StudyRule(), 0.6).peak == 2  # the run's likeliest
    two = decide([0.7, 0.8, 0.1, 0.9, 0.6, 0.1], [True] * 6, StudyRule(), 0.6)
    assert two.supporting == [Run(0, 1, 0.8), Run(3, 4, 0.9)] and two.peak == 3  # of the best run
    before = decide([0.95, 0.1, 0.7, 0.8], [False, True, True, True], StudyRule(max_out_of_scope_fraction=1.0), 0.6)
    assert before.supporting == [Run(2, 3, 0.8)] and before.peak == 3  # not the likelier slice before the run
    d = decide(p, [True] * 6, StudyRule(min_run=1), 0.6)
    assert d.decision == "stone" and d.supporting == [Run(1, 2, 0.6), Run(4, 4, 0.9)] and d.peak == 4
    assert d.reason.endswith("2 run(s) of >= 1 consecutive slices with p >= 0.6 (best: slice 4)")
    d = decide(p, [True] * 6, StudyRule(), 0.61)  # the model's threshold when the rule has none
    assert d == Decision("no_stone", "no 2 consecutive slices with p >= 0.61", 0.61, [], 4)
    d = decide(p, [True] * 6, StudyRule(threshold=0.55), 0.99)  # the rule's own threshold wins
    assert d.decision == "stone" and d.threshold == 0.55
    d = decide(p, [True, True, True, True, False, True], StudyRule(min_run=3), 0.5)
    assert d.decision == "no_stone" and d.peak == 1  # the 0.9 slice is out of scope: not the peak


def test_not_assessable_conditions_and_their_reasons():
    assert decide([], [], StudyRule(), 0.5) == Decision("not_assessable", "no slices", 0.5, [], None)
    assert decide([0.9, 0.9], [False, False], StudyRule(), 0.5) == \
        Decision("not_assessable", "none of the 2 slices is within the model's scope", 0.5, [], None)
    # out of scope outside the first..last in-scope range does not count
    assert decide([0.9] * 6, [False, False, True, True, False, False], StudyRule(), 0.5).decision == "stone"
    # inside it: 2 of 4 out is exactly the 0.5 allowed, 3 of 5 is over
    d = decide([0.9, 0.1, 0.1, 0.9], [True, False, False, True], StudyRule(), 0.5)
    assert d.decision == "no_stone" and d.peak == 0
    d = decide([0.9, 0.1, 0.1, 0.1, 0.95], [True, False, False, False, True], StudyRule(), 0.5)
    assert d == Decision("not_assessable", "3 of the 5 slices between the first and last in-scope slice are out of "
                                           "the model's scope", 0.5, [], 4)
    strict = StudyRule(max_out_of_scope_fraction=0.0)
    assert decide([0.9, 0.9, 0.9], [True, False, True], strict, 0.5).decision == "not_assessable"
    assert decide([0.9, 0.9, 0.9], [True, True, True], strict, 0.5).decision == "stone"


def test_fewer_slices_in_scope_than_a_run_needs_is_not_a_no_stone():
    """One confident stone slice, alone in its series: no run of 2 can form, so "no stone" would be false."""
    d = decide([0.9], [True], StudyRule(), 0.5)
    assert d == Decision("not_assessable", "1 slice(s) in scope, fewer than the 2 consecutive slices a stone call "
                                           "needs (for single slices: infer, or --min-run 1)", 0.5, [], 0)
    assert decide([0.1], [True], StudyRule(), 0.5).decision == "not_assessable"  # nor for a quiet one
    assert decide([0.9, 0.9, 0.9], [False, True, False], StudyRule(), 0.5).decision == "not_assessable"
    assert decide([0.9, 0.9, 0.9], [False, True, False], StudyRule(min_run=1), 0.5).decision == "stone"
    assert decide([0.9, 0.1], [True, True], StudyRule(), 0.5).decision == "no_stone"  # 2 in scope: a run could form
    assert decide([0.9, 0.9, 0.1], [True, True, True], StudyRule(min_run=3), 0.5).decision == "no_stone"
    assert decide([0.9, 0.9], [True, True], StudyRule(min_run=3), 0.5).decision == "not_assessable"


def test_slices_that_may_be_only_part_of_the_series_are_not_answered_no_stone():
    why = "the transfer stopped"
    d = decide([0.1, 0.2, 0.1], [True] * 3, StudyRule(), 0.5, incomplete=why)
    assert d == Decision("not_assessable", "the transfer stopped; 'no stone' would not cover the rest (no 2 "
                                           "consecutive slices with p >= 0.5 on the 3 slices at hand)", 0.5, [], 1)
    d = decide([0.1, 0.9, 0.8], [True] * 3, StudyRule(), 0.5, incomplete=why)
    assert d.decision == "stone" and [(r.start, r.end) for r in d.supporting] == [(1, 2)] and d.peak == 1
    assert d.reason == "1 run(s) of >= 2 consecutive slices with p >= 0.5 (best: slices 1-2); the transfer stopped"
    for empty in (None, ""):  # a whole series: as before
        assert decide([0.1, 0.2, 0.1], [True] * 3, StudyRule(), 0.5, incomplete=empty).decision == "no_stone"
        assert decide([0.1, 0.9, 0.8], [True] * 3, StudyRule(), 0.5, incomplete=empty).reason.endswith("1-2)")
    d = decide([0.9, 0.9], [False, False], StudyRule(), 0.5, incomplete=why)
    assert d.reason == "none of the 2 slices is within the model's scope"  # its own reason comes first


def test_run_score_is_the_best_windows_minimum():
    assert run_score([0.1, 0.8, 0.85, 0.2], 2) == 0.8
    assert run_score([0.1, 0.8, 0.85, 0.2], 1) == 0.85
    assert run_score([0.3, 0.9, 0.4, 0.5, 0.6], 3) == 0.4
    assert run_score([0.3, 0.4], 2) == 0.3 and run_score([0.3], 2) == -1.0


def test_choose_rule_prefers_specificity_at_the_target_then_the_higher_threshold_then_the_shorter_run():
    stone = [[0.1, 0.8, 0.85, 0.2], [0.2, 0.7, 0.75, 0.1]]
    normal = [[0.1, 0.9, 0.2, 0.1], [0.3, 0.3, 0.2, 0.1]]  # one single-slice alarm
    rule, stats = choose_rule(stone + normal, [True, True, False, False], min_runs=(1, 2), target_sensitivity=1.0)
    assert rule == StudyRule(min_run=2, threshold=0.7, source="chosen")
    assert stats == {"sensitivity": 1.0, "specificity": 1.0, "n_series": 4}
    # a tie in specificity goes to the higher threshold: min_run 1 at 0.75 beats min_run 2 at 0.7
    rule, stats = choose_rule([[0.8, 0.1], [0.75, 0.1], [0.1, 0.1]], [True, True, False], min_runs=(1, 2),
                              target_sensitivity=1.0)
    assert (rule.min_run, rule.threshold) == (1, 0.75) and stats["specificity"] == 1.0
    # equal thresholds too: the shorter run
    rule, _ = choose_rule([[0.8, 0.8], [0.1, 0.1]], [True, False], min_runs=(2, 1), target_sensitivity=1.0)
    assert (rule.min_run, rule.threshold) == (1, 0.8)
    # reaching the target costs specificity
    rule, stats = choose_rule([[0.9, 0.9], [0.1, 0.1], [0.2, 0.2]], [True, True, False], min_runs=(1,),
                              target_sensitivity=1.0)
    assert rule.threshold == 0.1 and stats["sensitivity"] == 1.0 and stats["specificity"] == 0.0
    # a target no rule reaches (a stone series shorter than the run): the best sensitivity, then threshold
    rule, stats = choose_rule([[0.9], [0.8, 0.8], [0.1, 0.1]], [True, True, False], min_runs=(2,),
                              target_sensitivity=1.0)
    assert rule.threshold == 0.8 and stats == {"sensitivity": 0.5, "specificity": 1.0, "n_series": 3}
    rule, stats = choose_rule([[0.9, 0.9], [0.1, 0.1], [0.2, 0.2]], [True, True, False], min_runs=(1,),
                              target_sensitivity=0.5)
    assert rule.threshold == 0.9 and stats == {"sensitivity": 0.5, "specificity": 1.0, "n_series": 3}


def test_choose_rule_needs_labelled_series_of_both_kinds():
    for probs, labels in (([[0.1]], [True, False]), ([[0.1], [0.2]], [True, True]), ([[0.1], [0.2]], [False, False])):
        with pytest.raises(ValueError, match="^choose_rule needs labelled series of both kinds$"):
            choose_rule(probs, labels)


def test_choose_rule_by_default_aims_at_95_percent_and_takes_labels_as_numbers_too():
    stone = [[0.1, 0.7, 0.75, 0.1], [0.6, 0.65, 0.1, 0.1]]
    normal = [[0.1, 0.9, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]  # one single-slice alarm at 0.9
    rule, stats = choose_rule(stone + normal, [True, True, False, False])
    assert (rule.min_run, rule.threshold) == (2, 0.6) and stats["specificity"] == 1.0  # not min_run 1 at 0.65
    interleaved = [stone[0], normal[0], stone[1], normal[1]]
    assert choose_rule(interleaved, [1, 0, 1, 0]) == (rule, stats)  # labels as numbers, in any order


def test_choose_rule_can_choose_a_threshold_of_zero_and_trades_specificity_only_at_the_target():
    rule, stats = choose_rule([[0.0, 0.0], [0.5, 0.5], [0.2, 0.2]], [True, True, False], min_runs=(1,),
                              target_sensitivity=1.0)
    assert rule.threshold == 0.0 and stats["sensitivity"] == 1.0
    # the target is out of reach (the first stone series is shorter than the run): sensitivity first
    rule, stats = choose_rule([[0.9], [0.3, 0.3], [0.6, 0.6], [0.5, 0.5]], [True, True, True, False], min_runs=(2,),
                              target_sensitivity=1.0)
    assert rule.threshold == 0.3 and stats["sensitivity"] == pytest.approx(2 / 3) and stats["specificity"] == 0.0


def test_an_unreadable_slice_in_or_beside_the_judged_range_keeps_no_stone_from_being_said():
    from edgekidney.study.rule import first_hole

    quiet, rule = [0.1] * 8, StudyRule()
    scope = [False, False, True, True, True, True, False, False]  # judged range: 2-5
    for k, expected in ((3, "not_assessable"), (1, "not_assessable"), (6, "not_assessable"),
                        (0, "no_stone"), (7, "no_stone")):
        holes = [i == k for i in range(8)]
        seen = [s and not h for s, h in zip(scope, holes)]  # an unreadable slice is not in scope
        d = decide(quiet, seen, rule, 0.5, unreadable=holes)
        assert d.decision == expected, (k, d)
        assert d.hole == (k if expected == "not_assessable" else None)
        if d.hole is not None:
            assert d == Decision("not_assessable", f"slice {k}, inside the range the model judges, could not be judged, "
                                 "so 'no stone' would not cover it (no 2 consecutive slices with p >= 0.5 on the "
                                 "others)", 0.5, [], 2 if k != 2 else 3, k)
    # a stone found on the slices that were read stays a stone, whatever is missing
    stone = decide([0.1, 0.9, 0.9, 0.1, 0.1], [True, True, True, False, True], rule, 0.5,
                   unreadable=[False, False, False, True, False])
    assert stone.decision == "stone" and stone.hole is None
    assert first_hole([True, False], [False, False]) is None  # nothing in scope: nothing judged to cover
    assert first_hole([False] * 4, [True] * 4) is None
    assert decide(quiet, scope, rule, 0.5).decision == "no_stone"  # without the argument: as before


def test_a_chest_series_is_not_answered_no_stone_and_a_stone_below_its_lungs_stays():
    """Slices put out of scope for their lung fields: when they outnumber the slices in scope, the few
    judged ones are the upper abdomen under a chest scan, and "no stone" would speak for the chest."""
    rule = StudyRule(max_out_of_scope_fraction=1.0)
    quiet = [0.1] * 7
    scope = [True, True, True, False, False, False, False]  # three judged, four chest slices above them
    chest = [False, False, False, True, True, True, True]
    d = decide(quiet, scope, rule, 0.5, chest=chest)
    assert d == Decision("not_assessable", "a chest series: 4 slices show lung fields and only 3 lie within the "
                                           "model's scope (no 2 consecutive slices with p >= 0.5 on those)",
                         0.5, [], 0)
    even = [False, False, False, False, True, True, True]  # as many chest slices as judged ones: an answer
    assert decide(quiet, scope, rule, 0.5, chest=even) == Decision("no_stone", "no 2 consecutive slices with p >= 0.5",
                                                                   0.5, [], 0)
    assert decide(quiet, scope, rule, 0.5).decision == "no_stone"  # nothing said of the lungs
    stone = [0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert decide(stone, scope, rule, 0.5, chest=chest).decision == "stone"


def test_the_reason_names_the_image_numbers_a_viewer_shows_when_it_has_them():
    """Images numbered head to feet (descending with position), one without a number."""
    images = [40, 39, 38, None, 36, 35]
    p = [0.1, 0.7, 0.8, 0.1, 0.9, 0.95]
    d = decide(p, [True] * 6, StudyRule(), 0.6, images=images)
    assert d.reason.endswith("(best: slices 4-5, images 36-35)")
    assert decide([0.1, 0.7, 0.8, 0.1, 0.1, 0.1], [True] * 6, StudyRule(), 0.6,
                  images=images).reason.endswith("(best: slices 1-2, images 39-38)")
    assert decide(p, [True] * 6, StudyRule(), 0.6, images=[7] * 6).reason.endswith("(best: slices 4-5, image 7)")
    assert decide([0.1] * 5 + [0.9], [True] * 6, StudyRule(min_run=1), 0.6,
                  images=images).reason.endswith("(best: slice 5, image 35)")
    assert decide([0.1, 0.9, 0.1, 0.1, 0.1, 0.1], [True] * 6, StudyRule(min_run=1), 0.6,
                  images=images).reason.endswith("(best: slice 1, image 39)")
    # an end without a number: the slices alone
    assert decide([0.1, 0.1, 0.8, 0.9, 0.1, 0.1], [True] * 6, StudyRule(), 0.6,
                  images=images).reason.endswith("(best: slices 2-3)")
    assert decide(p, [True] * 6, StudyRule(), 0.6).reason.endswith("(best: slices 4-5)")
    hole = decide([0.1] * 6, [True, True, False, True, True, True], StudyRule(), 0.6,
                  unreadable=[False, False, True, False, False, False], images=images)
    assert hole.reason.startswith("slice 2, image 38, inside the range the model judges, could not be judged")


def test_holes_are_unreadable_slices_and_slices_without_a_body_between_judged_ones():
    from edgekidney.study.rule import holes

    unreadable = [True, False, False, False, False, False]
    in_scope = [False, False, True, False, True, False]
    no_body = [False, True, False, True, False, True]  # before, between and after the judged slices 2 and 4
    assert holes(unreadable, in_scope, no_body) == [True, False, False, True, False, False]
    assert holes([False] * 3, [False] * 3, [True] * 3) == [False] * 3  # nothing judged: no range to be inside
