# Sourced by every device script: installs the carried wheels (.whl, ignored by git; fetch_wheels.sh puts
# them there) into /tmp/site on the bare GPU machine and puts the repository and them on the path.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl ${DEVICE_MPI:+.whl/mpi/*.whl} || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
