#!/usr/bin/env bash
# Mutation testing of the decision-critical modules with mutmut 3; see docs/mutation.md.
#
#   mutation/run.sh [GROUP ...]      GROUP: scope rule gates listener limits inputs (default: all six)
#   TESTS_REV=REV mutation/run.sh ...   the tests as they were at git REV (the "before" column of
#                                       docs/mutation.md), each group with the test files of that time
#   SAMPLE=N mutation/run.sh ...        only N mutants per group, drawn at random (seeded): an estimate
#
# Each group runs in its own scratch folder ($MUTATION_WORK/GROUP, default /tmp/edgekidney-mutation):
# a copy of edgekidney/ and tests/, and a setup.cfg [mutmut] section written here (pyproject.toml is
# not touched and not copied: the pytest options come from mutation/pytest.ini). Only the tests named
# for the group run, so each mutant costs seconds, not a training. Results: mutation/results/GROUP.txt.
# Needs mutmut 3 (pip install 'mutmut>=3.8,<4'); MUTMUT=path/to/mutmut to use another install.
set -euo pipefail
REPO=${EDGEKIDNEY_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
WORK=${MUTATION_WORK:-/tmp/edgekidney-mutation}
MUTMUT=${MUTMUT:-mutmut}
SHARED=${EDGEKIDNEY_SHARED:-$REPO/../shared}
export EDGEKIDNEY_DATA=${EDGEKIDNEY_DATA:-$SHARED/data/ct-kidney-axial}
export EDGEKIDNEY_TINY_CACHE=${EDGEKIDNEY_TINY_CACHE:-$WORK/tiny-cache}  # the tiny trained run, made once
TESTS_REV=${TESTS_REV:-}
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(scope rule gates listener limits inputs)

lines() { printf '\n    %s' "$@"; }

for group in "${groups[@]}"; do
  only=()  # mutant name patterns (fnmatch) when only some functions of a file are the target
  case "$group" in
    scope)
      mutate=(edgekidney/scope.py edgekidney/data/anatomy.py)
      tests=(tests/test_scope_math.py tests/test_chest.py
             tests/test_scope.py::test_mahalanobis_matches_the_textbook_formula_and_flags_far_points
             tests/test_scope.py::test_energy_is_lower_for_confident_logits) ;;
    rule)
      mutate=(edgekidney/study/rule.py)
      tests=(tests/test_rule.py
             tests/test_study.py::test_runs_are_maximal_consecutive_in_scope_slices_above_threshold
             tests/test_study.py::test_decision_needs_min_run_consecutive_slices
             tests/test_study.py::test_out_of_scope_inside_the_judgeable_range_makes_it_not_assessable
             tests/test_study.py::test_rule_comes_from_the_sidecar_when_present
             tests/test_study.py::test_choose_rule_on_validation_series) ;;
    gates)
      mutate=(edgekidney/bench/accuracy.py edgekidney/optimize/quantize.py)
      only=("edgekidney.bench.accuracy.*" "edgekidney.optimize.quantize.x__compare__*"
            "edgekidney.optimize.quantize.x_head_agreement__*" "edgekidney.optimize.quantize.x_quantize__*"
            "edgekidney.optimize.quantize.x__to_fp16__*")
      tests=(tests/test_gates.py tests/test_cli.py::test_benchmark_scripts_exit_1_on_usage_errors) ;;
    listener)
      mutate=(edgekidney/dicomnet/store.py edgekidney/dicomnet/jobs.py edgekidney/dicomnet/service.py
              edgekidney/dicomnet/scp.py edgekidney/dicomnet/sr.py)
      only=("edgekidney.dicomnet.store.*" "edgekidney.dicomnet.jobs.*" "edgekidney.dicomnet.service.x_append_line__*"
            "edgekidney.dicomnet.service.x_backoff_s__*" "edgekidney.dicomnet.service.x_renamed_uids__*"
            "edgekidney.dicomnet.sr.x_revise__*" "edgekidney.dicomnet.sr.x_revised_uid__*"
            "edgekidney.dicomnet.scp.xǁStorageSCPǁ_reopened__*" "edgekidney.dicomnet.service.xǁListenerǁrecover__*"
            "edgekidney.dicomnet.service.xǁListenerǁprocess_study__*"
            "edgekidney.dicomnet.scp.xǁStorageSCPǁhandle_store__*" "edgekidney.dicomnet.scp.xǁStorageSCPǁ_store__*"
            "edgekidney.dicomnet.scp.xǁStorageSCPǁ_over_limits__*" "edgekidney.dicomnet.scp.xǁStorageSCPǁdisk_low__*"
            "edgekidney.dicomnet.scp.xǁStorageSCPǁ_carried__*" "edgekidney.dicomnet.scp.xǁStorageSCPǁhandle_released__*"
            "edgekidney.dicomnet.scp.xǁStorageSCPǁhandle_closed__*" "edgekidney.dicomnet.scp.xǁStorageSCPǁwhy_rejected__*"
            "edgekidney.dicomnet.scp.x__shown_aet__*" "edgekidney.dicomnet.service.x_incompleteness__*"
            "edgekidney.dicomnet.service.x_refused_note__*")
      tests=(tests/test_durability.py
             tests/test_listener.py::test_job_table_is_idempotent_and_resumes_sending
             tests/test_listener.py::test_backoff_and_destination_parsing
             tests/test_listener.py::test_full_disk_refuses_associations_and_stores
             tests/test_listener.py::test_an_instance_declaring_a_huge_image_is_refused_at_c_store_and_not_stored
             tests/test_listener.py::test_restart_resumes_a_series_that_was_receiving
             tests/test_listener.py::test_calling_ae_allow_list
             tests/test_listener.py::test_called_ae_title_is_checked_when_asked
             tests/test_listener.py::test_associations_beyond_the_maximum_are_rejected) ;;
    limits)
      mutate=(edgekidney/data/limits.py)
      tests=(tests/test_limits.py tests/test_decode.py) ;;
    inputs)  # what a series or slice from another hospital is refused or warned for, and where results go
      mutate=(edgekidney/outputs.py edgekidney/data/geometry.py edgekidney/data/decode.py edgekidney/data/series.py
              edgekidney/study/rule.py)
      only=("edgekidney.outputs.*" "edgekidney.data.geometry.x_obliquity__*"
            "edgekidney.data.geometry.x_non_square_reason__*" "edgekidney.data.geometry.x_pixel_spacing_reason__*"
            "edgekidney.data.decode.x_photometric_reason__*" "edgekidney.data.decode.x__syntax_from_encoding__*"
            "edgekidney.data.decode.x__check_pixel_spacing__*" "edgekidney.data.series.x_build_series__*"
            "edgekidney.study.rule.x_holes__*")
      tests=(tests/test_series.py tests/test_decode.py
             tests/test_study.py::test_a_blank_slice_between_judged_ones_keeps_no_stone_from_being_said
             tests/test_rule.py::test_holes_are_unreadable_slices_and_slices_without_a_body_between_judged_ones
             tests/test_cli.py::test_bad_input_gives_one_line_error
             tests/test_cli.py::test_a_result_that_cannot_be_written_is_one_line_not_a_traceback
             tests/test_cli.py::test_a_rerun_writes_over_its_own_report_in_the_input_folder_and_never_over_a_slice
             tests/test_cli.py::test_infer_csv_to_stdout) ;;
    *) echo "unknown group '$group' (scope rule gates listener limits inputs)" >&2; exit 2 ;;
  esac
  if [ -n "$TESTS_REV" ]; then  # the tests as of REV (the "before" column), for the same modules
    case "$group" in
      scope) tests=(tests/test_scope.py  # less one test that fails at 2e13184 (the stone map changed the CAM)
                    --deselect tests/test_scope.py::test_cam_is_the_logit_margin_spread_over_the_image) ;;
      rule) tests=(tests/test_study.py) ;;
      gates) tests=(tests/test_bench.py tests/test_cli.py::test_benchmark_scripts_exit_1_on_usage_errors) ;;
      listener) tests=(tests/test_listener.py) ;;
      limits) tests=(tests/test_decode.py) ;;
    esac
  fi
  dir=$WORK/$group${TESTS_REV:+-before}
  rm -rf "$dir"
  mkdir -p "$dir"
  cp -r "$REPO/edgekidney" "$dir/"
  if [ -n "$TESTS_REV" ]; then
    git -C "$REPO" archive "$TESTS_REV" tests | tar -x -C "$dir"
    cp "$REPO/tests/conftest.py" "$dir/tests/conftest.py"  # its EDGEKIDNEY_TINY_CACHE: one training, not one per mutant
  else
    cp -r "$REPO/tests" "$dir/"
  fi
  cp -r "$REPO/examples" "$dir/"  # the example series and volume some tests read (test_decode, test_chest)
  find "$dir" -name __pycache__ -prune -exec rm -rf {} +
  cp "$REPO/mutation/pytest.ini" "$dir/pytest.ini"
  ln -s "$(cd "$SHARED" && pwd)" "$dir/shared"  # tests find ../shared from their checkout (mutants/)
  {
    echo "[mutmut]"
    echo "source_paths = edgekidney"
    echo -n "only_mutate ="; lines "${mutate[@]}"; echo
    echo -n "also_copy ="; lines pytest.ini examples; echo
    echo -n "pytest_add_cli_args_test_selection ="; lines "${tests[@]}"; echo
    echo -n "pytest_add_cli_args ="; lines -p no:cacheprovider; echo
    echo "use_git_change_detection = false"
  } > "$dir/setup.cfg"
  echo "== $group: mutating ${mutate[*]}"
  results=$REPO/mutation/results${TESTS_REV:+-before}
  mkdir -p "$results"
  names=("${only[@]}")
  if [ -n "${SAMPLE:-}" ]; then  # generate the mutants (and the stats) without running them, then draw
    (cd "$dir" && nice -n 19 "$(dirname "$(command -v "$MUTMUT")")/python" - > "$dir/generate.log" 2>&1 <<'PY'
from pathlib import Path
from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths
from mutmut.mutation.trampoline import set_mutant_under_test
set_mutant_under_test("mutant_generation")
Path("mutants").mkdir(exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(2)
PY
    ) || { echo "generating the mutants failed for $group:"; tail -5 "$dir/generate.log"; }
    mapfile -t names < <(ONLY="${only[*]}" python3 - "$dir" "$SAMPLE" "${mutate[@]}" <<'PY'
import fnmatch, os, random, re, sys
folder, n, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
only = os.environ["ONLY"].split()
names = []
for f in files:
    src = open(f"{folder}/mutants/{f}", encoding="utf-8").read()
    names += [f"{f[:-3].replace('/', '.')}.{m}" for m in re.findall(r"^\s*def (x\S*?__mutmut_\d+)\(", src, re.M)]
names = sorted(m for m in names if not only or any(fnmatch.fnmatch(m, p) for p in only))
random.Random(0).shuffle(names)
print("\n".join(sorted(names[:n])))
PY
)
  fi
  (cd "$dir" && nice -n 19 "$MUTMUT" run "${names[@]}" > "$dir/run.log" 2>&1) || { echo "mutmut run failed for $group:"; tail -c 3000 "$dir/run.log" | tr '\r' '\n' | tail -8; }
  (cd "$dir" && "$MUTMUT" results --all true > "$results/$group.txt" 2>&1) || true
  python3 "$REPO/mutation/score.py" "$results/$group.txt"
done
