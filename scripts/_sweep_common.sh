# Shared by scripts/table*.sh and scripts/supp_table*.sh (sourced, not run). See docs/tables.md.
#
# A table script sets TABLE, ROWS_DEFAULT (its experiment entries, configs/experiment/$TABLE/<row>.yaml)
# and SEEDS_DEFAULT, then calls `run_sweep "$@"`. Arguments are Hydra overrides passed to every run.
#
# Environment:
#   ROWS="a b"      run only these entries of the table (default: all of them)
#   SEEDS=0,1,2     seeds (default: 3 for Tables 2 and 3, 1 otherwise); a `seed=...` argument does the same
#   PYTHON=python   the interpreter
#   TORCHRUN="torchrun --nproc_per_node=8"
#                   one run at a time, each started by this command in place of `python`
#                   (one process per GPU, DDP). Any launcher prefix works, e.g. TORCHRUN=python for
#                   one plain process per run. Without it: one Hydra multirun (`train.py -m`), run
#                   by Hydra's launcher: the basic one (sequential, in this process) unless an
#                   argument picks another, e.g. hydra/launcher=submitit_slurm.
#   DRY_RUN=1       print the command(s) instead of running them
#
# Layout (both modes): <sweep dir>/<row>.seed<seed>/{results.json, metrics.csv, checkpoints/, .hydra/}
# <sweep dir> = the `hydra.sweep.dir=...` argument, else multirun/<table>/<date_time>.

set -euo pipefail

SWEEP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run_sweep() {
    local rows seeds sweep_dir="" arg
    local -a args=()
    read -r -a rows <<< "${ROWS:-$ROWS_DEFAULT}"
    seeds="${SEEDS:-$SEEDS_DEFAULT}"
    for arg in "$@"; do
        case "$arg" in
            hydra.sweep.dir=*) sweep_dir="${arg#hydra.sweep.dir=}" ;;
            seed=*) seeds="${arg#seed=}" ;;
            *) args+=("$arg") ;;
        esac
    done
    sweep_dir="${sweep_dir:-multirun/$TABLE/$(date +%Y-%m-%d_%H-%M-%S)}"
    local row known=" $ROWS_DEFAULT "
    for row in "${rows[@]}"; do
        if [[ "$known" != *" $row "* ]]; then
            echo "error: $TABLE has no entry '$row' (configs/experiment/$TABLE/); valid: $ROWS_DEFAULT" >&2
            return 2
        fi
    done
    local python="${PYTHON:-python}" train="$SWEEP_ROOT/train.py" status=0

    if [[ -n "${TORCHRUN:-}" ]]; then
        # One launch per run: Hydra's multirun would run every job inside one torchrun
        # process group, so the rows are looped here and each gets its own hydra.run.dir.
        local seed failed=() cmd
        local -a launcher
        read -r -a launcher <<< "$TORCHRUN"
        for row in "${rows[@]}"; do
            for seed in ${seeds//,/ }; do
                cmd=("${launcher[@]}" "$train" "experiment=$TABLE/$row" "seed=$seed" "${args[@]}"
                     "hydra.run.dir=$sweep_dir/$row.seed$seed")
                echo "[$TABLE] ${cmd[*]}" >&2
                if [[ -n "${DRY_RUN:-}" ]]; then continue; fi
                "${cmd[@]}" || { echo "[$TABLE] $row seed $seed failed (exit $?); going on" >&2; failed+=("$row.seed$seed"); }
            done
        done
        if ((${#failed[@]})); then
            echo "[$TABLE] failed runs: ${failed[*]}" >&2
            status=1
        fi
    else
        local exps
        exps="$(printf "$TABLE/%s," "${rows[@]}")"
        local -a cmd=("$python" "$train" -m "experiment=${exps%,}" "seed=$seeds" "hydra.sweep.dir=$sweep_dir"
                      'hydra.sweep.subdir=${row}.seed${seed}' "${args[@]}")
        echo "[$TABLE] ${cmd[*]}" >&2
        if [[ -z "${DRY_RUN:-}" ]]; then
            "${cmd[@]}" || status=$?
        fi
    fi
    echo "[$TABLE] runs in $sweep_dir; table: python $SWEEP_ROOT/scripts/make_tables.py $sweep_dir --out $sweep_dir/tables.md" >&2
    return $status
}
