export PYTHONPATH=$PWD:$PWD/.devdeps
export MEMOPT_DEBUG=1
timeout 200 python -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | grep -E "Error|offload_states.py:|passed|failed|^E " | head -30
SKIP_TESTS=1 OUT=$OUT bash scripts/gpu_check.sh 2>&1 | grep -E "^baseline|^offload" 
