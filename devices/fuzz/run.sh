#!/usr/bin/env bash
# Fuzzes the devices crate: every cargo-fuzz target for an equal share of
# SECONDS (default 600), with libFuzzer and AddressSanitizer.
#
#   devices/fuzz/run.sh [SECONDS]
#
# Works from any directory and from a clean clone: installs cargo-fuzz if it
# is missing (needs the nightly toolchain, `rustup toolchain install
# nightly`). Each target starts from its committed seeds
# (devices/fuzz/seeds/TARGET) plus whatever devices/fuzz/corpus/TARGET holds
# from earlier runs (new inputs are added there; it is not committed).
#
# Exit status: 0 if no target crashed; otherwise 1, after printing the path
# of each new crash/timeout/OOM artifact (devices/fuzz/artifacts/TARGET/...)
# with the commands that reproduce and decode it. Other failures (install,
# build) exit non-zero too.
#
# Environment: FUZZ_TARGETS="a b" runs only those targets; FUZZ_JOBS=N runs N
# libFuzzer processes per target (default 1; with N > 1 libFuzzer writes
# their output to devices/fuzz/fuzz-*.log); FUZZ_TOOLCHAIN (default nightly)
# is the toolchain cargo-fuzz builds with.
set -euo pipefail

seconds="${1:-600}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS]   (total fuzzing time, a positive integer)" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
jobs="${FUZZ_JOBS:-1}"

if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "error: the $toolchain toolchain is needed (rustup toolchain install $toolchain)" >&2
    exit 1
fi

start=$SECONDS
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || cargo install cargo-fuzz
    echo "== cargo-fuzz installed in $((SECONDS - start))s"
fi

targets="${FUZZ_TARGETS:-$(cargo "+$toolchain" fuzz list)}"
# shellcheck disable=SC2206
targets=($targets)
count="${#targets[@]}"
per_target=$((seconds / count))
if [ "$per_target" -lt 1 ]; then
    per_target=1
fi

echo "== building ${targets[*]}"
built=$SECONDS
cargo "+$toolchain" fuzz build
echo "== built in $((SECONDS - built))s"

parallel=()
if [ "$jobs" -gt 1 ]; then
    parallel=(-jobs="$jobs" -workers="$jobs")
fi

artifacts_of() {
    find "artifacts/$1" -type f \
        \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | sort
}

crashed=()
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${per_target}s"
    corpus="corpus/$target"
    mkdir -p "$corpus" "artifacts/$target"
    dirs=("$corpus")
    if [ -d "seeds/$target" ]; then
        dirs+=("seeds/$target")
    fi
    # Artifacts of earlier runs are kept; only new ones are reported.
    old=$(artifacts_of "$target")
    status=0
    cargo "+$toolchain" fuzz run "$target" "${dirs[@]}" -- \
        -max_total_time="$per_target" -rss_limit_mb=2048 -timeout=30 \
        -print_final_stats=1 ${parallel[@]+"${parallel[@]}"} || status=$?
    found=$(comm -13 <(echo "$old") <(artifacts_of "$target") | sed '/^$/d')
    if [ "$status" -ne 0 ] || [ -n "$found" ]; then
        echo "!! $target failed (exit status $status)" >&2
        if [ -n "$found" ]; then
            while IFS= read -r artifact; do
                echo "!! artifact: $here/$artifact" >&2
                echo "!!   reproduce: (cd $here && cargo +$toolchain fuzz run $target $artifact)" >&2
                echo "!!   decode:    (cd $here && cargo +$toolchain fuzz fmt $target $artifact)" >&2
            done <<<"$found"
        fi
        crashed+=("$target")
    fi
done

if [ "${#crashed[@]}" -ne 0 ]; then
    echo "== FAILED: ${crashed[*]}" >&2
    exit 1
fi
echo "== no crash in ${targets[*]} (${per_target}s each; $((SECONDS - start))s in all)"
