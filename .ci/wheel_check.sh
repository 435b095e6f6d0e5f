#!/usr/bin/env bash
# CI: build the sdist and the wheel, install the wheel into a fresh virtual environment outside the checkout, and run
# the package from there: a file missing from the wheel (or the sdist) fails here, not on a user's machine.
# The environment reuses the installed dependencies (--system-site-packages), so it installs nothing but the wheel;
# building fetches setuptools from the package registry (build isolation).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
unset PYTHONPATH
export PYTHONNOUSERSITE=1

python -m build --outdir "$tmp/dist" "$repo" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
sdist=("$tmp"/dist/*.tar.gz)
wheel=("$tmp"/dist/*.whl)

# what a user or a downstream packager gets besides the code
python - "${sdist[0]}" "${wheel[0]}" <<'EOF'
import sys, tarfile, zipfile

sdist, wheel = sys.argv[1:]
with tarfile.open(sdist) as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
missing = {"LICENSE", "README.md", "pyproject.toml", "lightning_attn/py.typed", "lightning_attn/__init__.py"} - names
assert not missing, f"the sdist lacks {sorted(missing)}"
with zipfile.ZipFile(wheel) as whl:
    names = set(whl.namelist())
    meta = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    entry = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
needed = {"lightning_attn/py.typed", "lightning_attn/backends/timm.py", "lightning_attn/writers/base.py"}
assert needed <= names, f"the wheel lacks {sorted(needed - names)}"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel lacks LICENSE"
assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names), "the wheel ships tests/examples"
assert "License-Expression: Apache-2.0" in meta and "lightning_attn.cli:main" in entry
print(f"sdist and wheel contents: ok ({len(names)} files in the wheel)")
EOF

python -m venv --system-site-packages "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install --quiet --no-deps --force-reinstall "${wheel[0]}"

# from outside the checkout, so neither the working directory nor the editable install can stand in for the wheel
cd "$tmp"
site="$("$py" - <<'EOF'
import importlib.metadata, os, sys

import lightning_attn

here = os.path.dirname(lightning_attn.__file__)
assert here.startswith(sys.prefix), f"lightning_attn imported from {here}, not from the wheel in {sys.prefix}"
assert os.path.isfile(os.path.join(here, "py.typed")), "py.typed is not installed"
assert importlib.metadata.version("lightning-attn") == lightning_attn.__version__
print(os.path.dirname(here))
EOF
)"
echo "import from the wheel: ok ($site)"

# the callback's docstring example, a real (tiny) fit, against the installed file
"$py" -m pytest -q --disable-warnings -p no:cacheprovider --rootdir "$tmp" --doctest-modules "$site/lightning_attn/callback.py"

# the command line, end to end: its entry point, and a render of a generated image
"$tmp/venv/bin/lightning-attn" --help >/dev/null
"$py" -c "import numpy as np, PIL.Image; PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype('uint8')).save('probe.png')"
"$tmp/venv/bin/lightning-attn" render timm:vit_tiny_patch16_224 probe.png -o render --methods raw rollout --tile-size 32 \
    >render.log 2>&1 || { cat render.log; exit 1; }
test -s render/index.html && test -s render/scalars.json && ls render/*.png >/dev/null
echo "lightning-attn --help and render from the wheel: ok"
