# Source this on a GPU machine that has torch and triton but not this project installed:
#   . benchmarks/gpu_env.sh && python3 -m turbo_repl.cli bench
# It makes the checkout importable as installed (`turbo_kernels`, `turbo_repl.configs`) without pip, and adds
# wheels found in .whl/ (imageio-ffmpeg, ftfy) to the path.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p /tmp/turbo-repl-path
ln -sfn "$_root/kernels" /tmp/turbo-repl-path/turbo_kernels
[ -e "$_root/turbo_repl/configs" ] || ln -s ../configs "$_root/turbo_repl/configs"
if ls "$_root"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/turbo-repl-site "$_root"/.whl/*.whl
  export PYTHONPATH="/tmp/turbo-repl-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="/tmp/turbo-repl-path:$_root:${PYTHONPATH:-}"
