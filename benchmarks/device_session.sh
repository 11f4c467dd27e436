#!/usr/bin/env bash
# One device call of the decode-vs-llama.cpp routine (issue 11), so that a session spends its GPU minutes measuring:
#   1. wheels the device lacks (a folder of them, WHEELS, default .whl) into /tmp/site; the package on the path;
#   2. llama.cpp built from the peers folder (PEERS, default .peers: ../shared/peers copied into the checkout and
#      carried) in the background, at nice 10;
#   3. the Devstral-shape GGUFs (TYPES, default "Q4_K_M Q8_0"), kept in /tmp while the machine stays warm;
#   4. the GPU tests named in GPU_TESTS (default: none), cut at GPU_TESTS_S seconds (default 240);
#   5. benchmarks/decode_ab.py on each GGUF with the --setting arguments given to this script;
#   6. llama-bench tg128 at depth 0 and 512 on each GGUF once the build is done, then one more run of the first
#      setting (the script's first two arguments, "--setting NAME...") on each file, after the build.
# Everything (ab_<type>.json, again_<type>.json, llama_<type>.json, gpu_tests.xml and the logs) is written to a
# scratch folder and packed at exit into $OUT/device_session.tgz; the JSONs and gpu_tests.xml are also copied to
# $OUT itself, as many as fit beside it: the device tool brings back at most 8 files of a call.
#   bash benchmarks/device_session.sh --setting base --setting "adv:DEVSTRAL_GRAPH_ADVANCE=0"
set -uo pipefail
RESULTS=${OUT:?run on the device machine, where OUT is set}
OUT=$(mktemp -d /tmp/device_session.XXXXXX)
pack() {
  tar -czf "$RESULTS/device_session.tgz" -C "$OUT" .
  ls "$OUT"/*.json "$OUT"/gpu_tests.xml 2>/dev/null | head -7 | xargs -r cp -t "$RESULTS"
}
trap pack EXIT
WHEELS=${WHEELS:-.whl}
PEERS=${PEERS:-.peers}
TYPES=${TYPES:-"Q4_K_M Q8_0"}
GPU_TESTS=${GPU_TESTS:-}
GPU_TESTS_S=${GPU_TESTS_S:-240}
[ $# -gt 0 ] || set -- --setting base

if [ -d "$WHEELS" ]; then
  pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1 || tail -3 "$OUT/pip.log"
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
  2>&1 | tail -1

rm -f /tmp/llama_done
if [ -x /tmp/llamacpp/bin/llama-bench ]; then
  touch /tmp/llama_done
else
  (nice -n 10 bash "$PEERS/build-llamacpp-cuda.sh" /tmp/llamacpp > "$OUT/llama_build.log" 2>&1; touch /tmp/llama_done) &
fi
for t in $TYPES; do
  f=/tmp/devstral-$t.gguf
  [ -f "$f" ] || python3 "$PEERS/mk_devstral_shape_gguf.py" "$f" --type "$t" > "$OUT/mk_$t.log" 2>&1 \
    || { echo "making $f failed"; tail -3 "$OUT/mk_$t.log"; }
done
if [ -n "$GPU_TESTS" ]; then
  # SIGINT: pytest writes its report for the tests it finished
  timeout -s INT "$GPU_TESTS_S" python3 -m pytest -q -m gpu $GPU_TESTS -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests: exit $?; $(tail -1 "$OUT/gpu_tests.log")"
fi
for t in $TYPES; do
  python3 benchmarks/decode_ab.py --gguf "/tmp/devstral-$t.gguf" --runs 3 --out "$OUT/ab_$t.json" "$@" \
    > "$OUT/ab_$t.log" 2>&1
  grep -h "^==\|tok/s" "$OUT/ab_$t.log" | sed "s/^/$t /"
done
for _ in $(seq 1 90); do [ -f /tmp/llama_done ] && break; sleep 5; done
for t in $TYPES; do
  /tmp/llamacpp/bin/llama-bench -m "/tmp/devstral-$t.gguf" -ngl 99 -fa 1 -p 0 -n 128 -d 0,512 -r 3 -o json \
    > "$OUT/llama_$t.json" 2> "$OUT/llama_$t.err" || tail -3 "$OUT/llama_$t.err"
  python3 -c "import json,sys; [print(sys.argv[2], 'llama.cpp depth', r['n_depth'], round(r['avg_ts'], 2))
for r in json.load(open(sys.argv[1]))]" "$OUT/llama_$t.json" "$t" 2>/dev/null
  python3 benchmarks/decode_ab.py --gguf "/tmp/devstral-$t.gguf" --runs 3 --out "$OUT/again_$t.json" "$1" "$2" \
    > "$OUT/again_$t.log" 2>&1
  grep -h "tok/s" "$OUT/again_$t.log" | sed "s/^/$t after the build: /"
done
