#!/usr/bin/env bash
# Copy the PyTorch reference code that bench/gpu_bench.py times (--side ref) into the git-ignored
# bench/reference_src/, at the commits this port follows. The reference code is never committed here.
#
#   bench/fetch_reference.sh                       # clones the two repositories from GitHub (needs network)
#   GD_GIT=/path/guided-diffusion/.git DIT_GIT=/path/DiT/.git bench/fetch_reference.sh   # from local clones
#
# Layout written (each folder is put first on sys.path by gpu_bench.py --side ref):
#   bench/reference_src/guided-diffusion/guided_diffusion/{unet,nn,fp16_util,gaussian_diffusion,respace,losses,
#                                                         resample,script_util,logger,__init__}.py
#   bench/reference_src/DiT/models.py, bench/reference_src/DiT/diffusion/*.py
#   bench/reference_src/SOURCES.txt  (repository, commit and licence of each file)
# guided-diffusion's train_util/dist_util are left out: they need blobfile and an MPI start-up; gpu_bench.py drives
# the reference training step through MixedPrecisionTrainer itself.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/bench/reference_src"
GD_COMMIT="${GD_COMMIT:-22e0df8183507e13a7813f8d38d51b072ca1e67c}"
DIT_COMMIT="${DIT_COMMIT:-ed81ce2229091fd4ecc9a223645f95cf379d582b}"
GD_FILES=(__init__.py unet.py nn.py fp16_util.py gaussian_diffusion.py respace.py losses.py resample.py
          script_util.py logger.py)
DIT_FILES=(models.py diffusion/__init__.py diffusion/diffusion_utils.py diffusion/gaussian_diffusion.py
           diffusion/respace.py diffusion/timestep_sampler.py)

die() { echo "fetch_reference: error: $*" >&2; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# git_dir VAR URL: a local git directory from $VAR, a mirror made by this workplace's fetch tool, or a bare clone.
git_dir() {
    local var="$1" url="$2" mirror="$3" given="${!1:-}"
    if [ -n "$given" ]; then
        [ -d "$given" ] || die "$var=$given is not a directory"
        echo "$given"; return
    fi
    if [ -d "$mirror" ]; then echo "$mirror"; return; fi
    git clone -q --bare "$url" "$TMP/$(basename "$url").git" >&2 \
        || die "cannot clone $url; set $var to a local clone's .git directory"
    echo "$TMP/$(basename "$url").git"
}

GD_GIT_DIR="$(git_dir GD_GIT https://github.com/openai/guided-diffusion /work/.mirror/openai+guided-diffusion/repo)"
DIT_GIT_DIR="$(git_dir DIT_GIT https://github.com/facebookresearch/DiT /work/.mirror/facebookresearch+DiT/repo)"

# copy GIT_DIR COMMIT SRC DEST: one file at one commit.
copy() {
    local gitdir="$1" commit="$2" src="$3" dest="$4"
    mkdir -p "$(dirname "$dest")"
    git --git-dir="$gitdir" show "$commit:$src" >"$dest" 2>/dev/null \
        || die "$src is not in $gitdir at $commit (is the commit fetched?)"
}

rm -rf "$OUT.new"
for f in "${GD_FILES[@]}"; do
    copy "$GD_GIT_DIR" "$GD_COMMIT" "guided_diffusion/$f" "$OUT.new/guided-diffusion/guided_diffusion/$f"
done
for f in "${DIT_FILES[@]}"; do
    copy "$DIT_GIT_DIR" "$DIT_COMMIT" "$f" "$OUT.new/DiT/$f"
done
cat >"$OUT.new/SOURCES.txt" <<EOF
Copied by bench/fetch_reference.sh; not part of this repository (git-ignored), used only to time the references.
guided-diffusion/  https://github.com/openai/guided-diffusion @ $GD_COMMIT (MIT licence)
DiT/               https://github.com/facebookresearch/DiT @ $DIT_COMMIT (CC-BY-NC 4.0)
EOF
rm -rf "$OUT"
mv "$OUT.new" "$OUT"
echo "fetch_reference: wrote $(find "$OUT" -name '*.py' | wc -l) files ($(du -sh "$OUT" | cut -f1)) to $OUT"
